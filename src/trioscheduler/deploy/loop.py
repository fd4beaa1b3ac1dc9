"""The process-wide background trio thread behind every sync facade.

A sync ``Client`` or ``LocalCluster`` needs a trio loop that outlives any one call, as
dask's shared event loop does. ``loop_runner()`` starts one daemon thread running
``trio.run`` on first use; every sync call crosses into it with ``trio.from_thread``.

* ``run(async_fn, *args)`` blocks the calling thread until the coroutine finishes and
  returns its value or re-raises its exception.
* ``enter(async_cm)`` enters an async context manager inside the loop and keeps it open
  in a task of the runner's nursery (so ``async with`` objects that own a nursery, such
  as a Scheduler or a Client, live as long as the sync handle); ``.close()`` exits it.
* ``start_soon(async_fn, *args)`` is fire-and-forget (callbacks); failures are logged.

Calling a blocking method from inside the loop thread (or from any trio task) would
deadlock, so it raises ``LoopError`` instead. At interpreter exit the handles still open
are closed gracefully (bounded by a timeout), then the loop is cancelled.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, TypeVar

import trio

from trioscheduler.errors import TrioSchedulerError
from trioscheduler.wire import busy_poll

__all__ = ["Entered", "LoopError", "LoopRunner", "loop_runner"]

T = TypeVar("T")
logger = logging.getLogger("trioscheduler.loop")

SHUTDOWN_TIMEOUT = 10.0
"""Seconds allowed at interpreter exit for open handles to close before cancellation."""


class LoopError(TrioSchedulerError, RuntimeError):
    """A blocking call into the background loop was made where it would deadlock."""


class Entered(Generic[T]):
    """An async context manager held open inside the loop; ``close()`` exits it.

    If the context manager fails while held (its own nursery crashed), the error is kept
    and re-raised by ``close()``; ``failed`` tells whether that happened.
    """

    __slots__ = ("_closing", "_done", "_error", "_runner", "name", "value")

    def __init__(self, runner: LoopRunner, name: str) -> None:
        self._runner = runner
        self._closing = trio.Event()
        self._done = trio.Event()
        self._error: BaseException | None = None
        self.name = name
        self.value: T

    @property
    def closed(self) -> bool:
        return self._done.is_set()

    @property
    def failed(self) -> BaseException | None:
        return self._error

    def close(self) -> None:
        """Exit the context manager (blocking); idempotent; re-raises an exit error."""
        if not self._done.is_set():
            self._runner.run(self.aclose)
        err, self._error = self._error, None
        if err is not None:
            raise err

    async def aclose(self) -> None:
        """Exit from inside the loop (without raising the held error)."""
        self._closing.set()
        await self._done.wait()


class LoopRunner:
    """One daemon thread running ``trio.run``; see the module docstring."""

    def __init__(self, name: str = "trioscheduler-loop") -> None:
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._cancel: trio.CancelScope | None = None
        self._handles: set[Entered[Any]] = set()
        self._started = threading.Event()
        self._error: BaseException | None = None
        # what user threads sleep on while the loop works for them: the loop busy-polls
        # only then (``wire.busy_poll``; at other times they may want the GIL); emptied
        # by the loop as it wakes them, so a thread woken is never spun against
        self.sleepers: set[object] = set()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise LoopError(f"the background trio loop failed to start: {self._error!r}")

    # -- the loop thread -----------------------------------------------------------

    def _main(self) -> None:
        try:
            trio.run(self._serve, instruments=busy_poll.install())
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            self._error = exc
            logger.exception("the background trio loop stopped with an error")
        finally:
            self._token = None
            self._started.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        busy_poll.add_gate(self.sleepers.__len__)
        with trio.CancelScope() as scope:
            self._cancel = scope
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._started.set()
                await trio.sleep_forever()

    # -- public API ------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._token is not None

    @property
    def in_loop_thread(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def _check_callable_here(self, what: str) -> trio.lowlevel.TrioToken:
        if self.in_loop_thread:
            raise LoopError(
                f"{what} blocks until the trioscheduler loop answers, but it was called from "
                "inside that loop's own thread; use the asynchronous API (await ...) there"
            )
        if trio.lowlevel.in_trio_task():  # (no exception raised and caught: ~2 us less)
            raise LoopError(
                f"{what} is blocking and was called from inside a trio task; use the "
                "asynchronous API instead (e.g. Client(..., asynchronous=True))"
            )
        token = self._token
        if token is None:
            raise LoopError("the trioscheduler background loop has shut down")
        return token

    def check_blocking(self, what: str) -> None:
        """Raise ``LoopError`` if blocking here for the loop would deadlock."""
        self._check_callable_here(what)

    def run(self, async_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``async_fn(*args)`` in the loop; block for its result or exception."""
        token = self._check_callable_here("run()")
        mark = object()
        self.sleepers.add(mark)
        try:
            return trio.from_thread.run(self._woken_after, mark, async_fn, args, trio_token=token)
        except trio.RunFinishedError:
            raise LoopError("the trioscheduler background loop has shut down") from None
        finally:
            self.sleepers.discard(mark)

    async def _woken_after(
        self, mark: object, async_fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]
    ) -> T:
        try:
            return await async_fn(*args)
        finally:
            self.sleepers.discard(mark)  # in the loop, before the caller wakes

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run the sync ``fn(*args)`` in the loop thread (for touching loop-owned state)."""
        if self.in_loop_thread:
            return fn(*args)
        token = self._check_callable_here("run_sync()")
        try:
            return trio.from_thread.run_sync(fn, *args, trio_token=token)
        except trio.RunFinishedError:
            raise LoopError("the trioscheduler background loop has shut down") from None

    def start_soon(self, async_fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Fire and forget ``async_fn(*args)`` in the loop, from any thread; errors are logged."""

        def spawn() -> None:
            if self._nursery is not None:
                self._nursery.start_soon(_logged, async_fn, args)

        if self.in_loop_thread:
            spawn()
            return
        token = self._token
        if token is None:
            raise LoopError("the trioscheduler background loop has shut down")
        try:
            token.run_sync_soon(spawn)
        except trio.RunFinishedError:
            raise LoopError("the trioscheduler background loop has shut down") from None

    def enter(self, cm: AbstractAsyncContextManager[T], name: str = "") -> Entered[T]:
        """Enter ``cm`` in the loop and keep it open until ``handle.close()``.

        An error while entering is raised here, in the calling thread.
        """
        self._check_callable_here("enter()")
        handle: Entered[T] = Entered(self, name or type(cm).__name__)

        async def start() -> T:
            assert self._nursery is not None
            value: T = await self._nursery.start(self._hold, cm, handle)
            return value

        handle.value = self.run(start)
        return handle

    async def _hold(
        self,
        cm: AbstractAsyncContextManager[T],
        handle: Entered[T],
        *,
        task_status: trio.TaskStatus[T] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        started = False
        try:
            async with cm as value:
                self._handles.add(handle)
                task_status.started(value)
                started = True
                await handle._closing.wait()
        except BaseException as exc:
            if not started or isinstance(exc, trio.Cancelled):
                raise
            # Kept for close(); crashing the runner's nursery would kill every other handle.
            handle._error = exc
            logger.warning("%s failed while held open: %r", handle.name, exc)
        finally:
            self._handles.discard(handle)
            handle._done.set()

    def stop(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Close every open handle (bounded by ``timeout``), cancel the loop, join."""
        if not self.alive or self.in_loop_thread:
            return

        async def shutdown() -> None:
            with trio.move_on_after(timeout):
                async with trio.open_nursery() as nursery:
                    for handle in list(self._handles):
                        nursery.start_soon(handle.aclose)
            if self._cancel is not None:
                self._cancel.cancel()

        try:
            self.run(shutdown)
        except LoopError:
            pass
        self._thread.join(timeout)


async def _logged(async_fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
    try:
        await async_fn(*args)
    except Exception:
        logger.exception("background callback %r failed", async_fn)


_runner: LoopRunner | None = None
_runner_lock = threading.Lock()


def loop_runner() -> LoopRunner:
    """The process-wide runner, started on first use (and again if it was stopped)."""
    global _runner
    runner = _runner
    if runner is not None and runner.alive:
        return runner
    with _runner_lock:
        if _runner is None or not _runner.alive:
            _runner = LoopRunner()
        return _runner


@atexit.register
def _shutdown_at_exit() -> None:
    runner = _runner
    if runner is not None:
        runner.stop()
