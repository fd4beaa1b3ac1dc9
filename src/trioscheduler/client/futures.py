"""Futures: a user's handle on one key of the cluster, and the waiting functions.

Every ``Future`` for a key in one client shares one ``KeyState``, which the client's
receive loop updates from the scheduler's ``KeyInMemory``/``KeyErred``/``KeyCancelled``/
``KeyLost`` messages. Key states are only ever changed in the thread that runs the
client's trio loop (the background loop for a sync client, the user's trio thread for an
asynchronous one); other threads only read ``status``.

The client counts live ``Future`` objects per key. When the last one is released or
garbage-collected, the client tells the scheduler it no longer wants the key
(``ClientReleasesKeys``, batched with everything else the client sends).

A ``Future`` needs six things of its client, named in ``FutureHost`` (``Client`` is
the one implementation): counting (``hold_key``/``unhold_key``), crossing into the
client's loop (``sync``), blocking a thread until a key is done (``wait_until_done``),
fetching values (``fetch``) and done-callbacks (``add_done_callback``).

With a sync client the blocking methods (``result``, ``exception``...) cross into the
loop thread; with an asynchronous client they return awaitables (``await f.result()``,
or simply ``await f``), as in dask.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import trio

from trioscheduler.errors import TrioSchedulerError
from trioscheduler.wire import runspec
from trioscheduler.wire.remote_error import unpack_exception

if TYPE_CHECKING:
    from trioscheduler.client.client import Client

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "DoneAndNotDoneFutures",
    "Future",
    "FutureCancelledError",
    "FutureHost",
    "KeyState",
    "futures_of",
    "wait",
]

ALL_COMPLETED = "ALL_COMPLETED"
FIRST_COMPLETED = "FIRST_COMPLETED"
DONE_STATUSES = frozenset({"finished", "error", "cancelled"})


class FutureCancelledError(TrioSchedulerError, concurrent.futures.CancelledError):
    """The future's key was cancelled (by ``cancel``, a closing client, or the scheduler)."""

    def __init__(self, key: Any, reason: str = "") -> None:
        self.key = key
        self.reason = reason or "unknown"
        super().__init__(f"{key!r} cancelled for reason: {self.reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key, self.reason))


_NOTHING: Any = object()  # KeyState._value when no small result came with the completion


class KeyState:
    """What one client knows about one key; shared by all its ``Future`` objects.

    ``status``: ``pending`` -> ``finished`` | ``error`` | ``cancelled``; ``lost`` (the
    only copy died, the scheduler recomputes) and ``pending`` again (``retry``) lead back.
    ``hooks`` are one-shot sync callables run in the loop thread when the key is done
    (appended in the loop thread, or by ``add_waiter`` from any thread).

    A client of a million futures holds a million of these, so a state keeps to seven
    slots: the rare parts (an error's three fields, a cancellation's reason) share one,
    and a small result pushed with the completion is held as itself, not in a tuple.
    """

    __slots__ = ("_detail", "_event", "_value", "hooks", "key", "status", "type_name")

    def __init__(self, key: Any) -> None:
        self.key = key
        self.status = "pending"
        self.type_name = ""
        # ``(exc_blob, tb_blob, exc_text)`` once erred, the reason once cancelled
        self._detail: Any = None
        self._event: trio.Event | None = None
        self.hooks: list[Callable[[], None]] = []
        # a small result the scheduler pushed with its completion
        # (``_executor.pushable``): ``result()``/``gather`` need not fetch it.
        self._value: Any = _NOTHING

    @property
    def done(self) -> bool:
        return self.status in DONE_STATUSES

    @property
    def held(self) -> tuple[Any] | None:
        """``(value,)`` of a small result that came with the completion, else ``None``."""
        value = self._value
        return None if value is _NOTHING else (value,)

    @held.setter
    def held(self, held: tuple[Any] | None) -> None:
        self._value = _NOTHING if held is None else held[0]

    def keep(self, value: Any) -> None:
        """Hold a small result that came just ahead of the key's completion."""
        self._value = value

    @property
    def exc_blob(self) -> bytes:
        return self._detail[0] if self.status == "error" else b""

    @property
    def tb_blob(self) -> bytes:
        return self._detail[1] if self.status == "error" else b""

    @property
    def exc_text(self) -> str:
        return self._detail[2] if self.status == "error" else ""

    @property
    def reason(self) -> str:
        return self._detail if self.status == "cancelled" else ""

    def _settle(self, status: str) -> None:
        self.status = status
        event, self._event = self._event, None
        if event is not None:
            event.set()
        if status in DONE_STATUSES and self.hooks:
            hooks, self.hooks = self.hooks, []
            for hook in hooks:
                hook()

    def add_waiter(self, wake: Callable[[], None]) -> bool:
        """Any thread: ``wake()`` (from the loop thread) once the key is done; ``True``
        instead if it is done already.

        Without a lock or a trip into the loop: ``_settle`` sets ``status`` before it
        takes the hook list, so a hook appended after the list was taken finds the
        status done on the check that follows the append (both run under the GIL, and
        a list append is atomic). At worst ``wake`` is called once after ``True``.
        """
        if self.status in DONE_STATUSES:
            return True
        self.hooks.append(wake)
        return self.status in DONE_STATUSES

    def finish(self, type_name: str = "") -> None:
        self.type_name = type_name
        self._settle("finished")

    def erred(self, exc_blob: bytes, tb_blob: bytes, exc_text: str) -> None:
        self._detail = (exc_blob, tb_blob, exc_text)
        self._settle("error")

    def cancel(self, reason: str = "") -> None:
        self._value = _NOTHING
        self._detail = reason
        self._settle("cancelled")

    def lost(self) -> None:
        self._value = _NOTHING
        self._settle("lost")

    def reset(self) -> None:
        self._value = _NOTHING
        self._detail = None
        self._settle("pending")

    async def wait(self) -> None:
        """Until the key is done (finished, erred or cancelled). Loop thread only."""
        while self.status not in DONE_STATUSES:
            if self._event is None:
                self._event = trio.Event()
            await self._event.wait()

    def exception(self) -> BaseException | None:
        if self.status == "error":
            return unpack_exception(*self._detail)
        if self.status == "cancelled":
            return FutureCancelledError(self.key, self._detail)
        return None


class FutureHost(Protocol):
    """What a ``Future`` uses of its client (and all it may use)."""

    id: str
    asynchronous: bool

    def hold_key(self, key: Any) -> KeyState: ...
    def unhold_key(self, key: Any) -> None: ...
    def sync(self, async_fn: Callable[..., Any], *args: Any) -> Any: ...
    def wait_until_done(self, st: KeyState, timeout: float | None, key: Any) -> bool: ...
    def fetch(self, keys: list[Any], errors: str = "raise") -> Awaitable[dict[Any, Any]]: ...
    def add_done_callback(self, future: Future, fn: Callable[[Future], Any]) -> None: ...


class Future:
    """A remote value being computed under ``key``; see the module docstring.

    ``Future(key, client)`` makes another handle on a key the client already knows.
    """

    __slots__ = ("__weakref__", "_released", "_state", "client", "key")

    def __init__(self, key: Any, client: Client, _state: KeyState | None = None) -> None:
        self.key = key
        self.client = client
        self._released = True  # until counted by the client: __del__ must not uncount
        self._state = _state if _state is not None else client.hold_key(key)
        self._released = False

    # -- status ----------------------------------------------------------------------

    @property
    def status(self) -> str:
        """``pending``, ``finished``, ``error``, ``cancelled`` or ``lost``."""
        return self._state.status

    @property
    def type(self) -> str:
        """The type name of the result, once finished (dask gives the type itself)."""
        return self._state.type_name

    def done(self) -> bool:
        return self._state.done

    def cancelled(self) -> bool:
        return self._state.status == "cancelled"

    # -- results ---------------------------------------------------------------------

    def result(self, timeout: float | None = None) -> Any:
        """The value; raises the task's exception (original type, remote traceback)."""
        client, st = self.client, self._state
        if not client.asynchronous and client.wait_until_done(st, timeout, self.key):
            # A sync client woke us straight from the loop once the key was done: a
            # small value or an error needs no trip into the loop at all.
            status = st.status
            if status == "finished":
                held = st.held
                if held is not None:
                    return held[0]
            elif status in ("error", "cancelled"):
                exc = st.exception()
                assert exc is not None
                raise exc
        return client.sync(self._result, timeout)

    async def _result(self, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        await _wait_state(self._state, timeout, self.key)
        st = self._state
        if st.held is not None and st.status == "finished":
            return st.held[0]
        exc = st.exception()
        if exc is not None:
            raise exc
        values = await self.client.fetch([self.key], errors="raise")
        if self.key not in values:  # it went back to pending (lost), wait again
            return await self._result(timeout)
        return values[self.key]

    def exception(self, timeout: float | None = None) -> Any:
        """The task's exception once done (``None`` if it finished)."""
        return self.client.sync(self._exception, timeout)

    async def _exception(self, timeout: float | None = None) -> BaseException | None:  # noqa: ASYNC109
        await _wait_state(self._state, timeout, self.key)
        if self._state.status == "cancelled":
            raise FutureCancelledError(self.key, self._state.reason)
        return self._state.exception()

    def traceback(self, timeout: float | None = None) -> Any:
        """The remote traceback (a traceback object, for ``traceback.print_tb`` or
        ``pdb.post_mortem``), or ``None`` if the task did not fail."""
        return self.client.sync(self._traceback, timeout)

    async def _traceback(self, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        await _wait_state(self._state, timeout, self.key)
        if self._state.status != "error":
            return None
        exc = self._state.exception()
        return None if exc is None else exc.__traceback__

    def __await__(self) -> Any:
        if not self.client.asynchronous:
            raise TypeError(
                "this future belongs to a sync Client: call future.result(), or use "
                "Client(..., asynchronous=True) inside trio or asyncio"
            )
        return self.client.sync(self._result).__await__()

    @property
    def executor(self) -> Client:
        """The client this future runs on (dask's name: a client is an executor)."""
        return self.client

    def bind_client(self, client: Client) -> None:
        """Move this handle to ``client``: it holds the key there, and no longer here."""
        if client is self.client:
            return
        st = client.hold_key(self.key)
        if not client.asynchronous:
            # The new client's claim reaches the scheduler before the old one lets go
            # (they are separate streams): one request behind it is the barrier.
            client.sync(client.rpc, {"op": "task_states", "keys": [self.key]})
        old, self.client, self._state = self.client, client, st
        if not self._released:
            old.unhold_key(self.key)
        self._released = False

    def substitute(self, subs: dict[Any, Any], key: Any = None) -> Any:
        """dask's graph-node protocol: a reference to ``subs[self.key]`` if this key is
        renamed (a ``TaskRef``), else this future."""
        if self.key not in subs:
            return self
        from dask._task_spec import GraphNode, TaskRef

        val = subs[self.key]
        if isinstance(val, GraphNode):
            return val.substitute({}, key=self.key)
        if isinstance(val, TaskRef):
            return val
        return TaskRef(val)

    # -- lifetime --------------------------------------------------------------------

    def add_done_callback(self, fn: Callable[[Future], Any]) -> None:
        """Call ``fn(future)`` once done, in a separate thread (it may block)."""
        self.client.add_done_callback(self, fn)

    def cancel(self, force: bool = False, reason: str = "") -> Any:
        return self.client.cancel([self], force=force, reason=reason)

    def retry(self) -> Any:
        return self.client.retry([self])

    def release(self) -> None:
        """Drop this handle; the key is released on the cluster when no handle is left."""
        if not self._released:
            self._released = True
            self.client.unhold_key(self.key)

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: S110 - interpreter shutdown, closed loop: nothing to do
            pass

    # -- identity --------------------------------------------------------------------

    def __dask_tokenize__(self) -> tuple[str, Any, str]:
        # The client is part of the token: dask deduplicates expressions by token, and a
        # persisted collection rebuilt for another client must not come back holding
        # the first client's futures.
        return ("trioscheduler.Future", self.key, self.client.id)

    def __reduce__(self) -> Any:
        raise TypeError(
            "a Future cannot be pickled on its own; pass it as an argument of submit/map "
            "(it becomes a dependency) or gather its result first"
        )

    def __repr__(self) -> str:
        if self._state.type_name:
            return f"<Future: {self.status}, type: {self._state.type_name}, key: {self.key}>"
        return f"<Future: {self.status}, key: {self.key}>"


runspec.register_reference(Future, lambda f: f.key)


async def _wait_state(state: KeyState, timeout: float | None, key: Any) -> None:  # noqa: ASYNC109
    if state.done:
        return
    if timeout is None:
        await state.wait()
        return
    with trio.move_on_after(timeout):
        await state.wait()
    if not state.done:
        raise TimeoutError(f"future {key!r} was not done after {timeout} s")


def futures_of(obj: Any) -> list[Future]:
    """The futures inside ``obj`` (a future, or lists/tuples/sets/dicts nesting them)."""
    out: list[Future] = []
    stack = [obj]
    while stack:
        x = stack.pop()
        if type(x) is Future:
            out.append(x)
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
    out.reverse()
    return out


class DoneAndNotDoneFutures(NamedTuple):
    done: set[Future]
    not_done: set[Future]


def wait(
    fs: Future | Iterable[Future], timeout: float | None = None, return_when: str = ALL_COMPLETED
) -> Any:
    """Until all (or the first of) ``fs`` are done; ``(done, not_done)`` sets.

    Raises ``TimeoutError`` after ``timeout`` seconds with ``ALL_COMPLETED``. With an
    asynchronous client this returns an awaitable.
    """
    if timeout is not None and not isinstance(timeout, (int, float)):
        raise TypeError(
            f"timeout= must be a number of seconds, got {timeout!r}; "
            "pass the futures as one list: wait([x, y, z])"
        )
    if return_when not in (ALL_COMPLETED, FIRST_COMPLETED):
        raise ValueError(
            f"return_when must be {ALL_COMPLETED!r} or {FIRST_COMPLETED!r}, got {return_when!r}"
        )
    futures = futures_of(fs)
    if not futures:
        return DoneAndNotDoneFutures(set(), set())
    return futures[0].client.sync(_wait, futures, timeout, return_when)


async def _wait(
    futures: list[Future],
    timeout: float | None,  # noqa: ASYNC109
    return_when: str,
) -> DoneAndNotDoneFutures:
    with trio.move_on_after(float("inf") if timeout is None else timeout):
        if return_when == ALL_COMPLETED:
            for f in futures:
                await f._state.wait()
        elif not any(f._state.done for f in futures):
            event = trio.Event()
            for f in futures:
                f._state.hooks.append(event.set)
            try:
                await event.wait()
            finally:
                for f in futures:
                    if event.set in f._state.hooks:
                        f._state.hooks.remove(event.set)
    done = {f for f in futures if f._state.done}
    not_done = {f for f in futures if not f._state.done}
    if not_done and return_when == ALL_COMPLETED:
        raise TimeoutError(
            f"{len(not_done)} of {len(futures)} futures were not done after {timeout} s"
        )
    return DoneAndNotDoneFutures(done, not_done)
