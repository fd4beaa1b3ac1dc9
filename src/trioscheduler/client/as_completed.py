"""``as_completed``: futures in the order they finish, sync or async iteration.

A one-shot hook on each future's ``KeyState`` (run in the loop thread when the key is
done) moves the future into a ready queue. Sync consumers block on a
``threading.Condition``; async consumers (an asynchronous client, same thread as the
hooks) wait on a ``trio.Event``. No polling on either side.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import trio

from trioscheduler.client.futures import Future

__all__ = ["as_completed"]


class as_completed:  # noqa: N801 - dask's name
    """Iterate over ``futures`` as they complete; ``add`` more while iterating.

    ``with_results=True`` yields ``(future, result)``; with ``raise_errors=True`` a
    failed future raises its exception from ``next`` instead.
    """

    def __init__(
        self,
        futures: Iterable[Future] | None = None,
        with_results: bool = False,
        raise_errors: bool = True,
        *,
        timeout: float | None = None,
    ) -> None:
        self.with_results = with_results
        self.raise_errors = raise_errors
        self.timeout = timeout
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._pending: dict[int, Future] = {}  # id(future) -> future (a future may repeat)
        self._pending_count = 0
        self._ready: deque[Future] = deque()
        self._async_event: trio.Event | None = None
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._generation = 0
        self._sync_futures = False  # of sync clients: iterate with ``for``
        self._async_futures = False  # of asynchronous clients: iterate with ``async for``
        self._async_client: Any = None  # one of them: its loop runs the waiting
        if futures:
            self.update(futures)

    # -- feeding -------------------------------------------------------------------

    def update(self, futures: Iterable[Future]) -> None:
        """Add several futures; each is yielded once it completes."""
        for f in futures:
            if not isinstance(f, Future):
                raise TypeError(f"as_completed takes futures, got {f!r:.100}")
            if f.client.asynchronous:
                self._async_futures = True
                self._async_client = f.client
            else:
                self._sync_futures = True
            with self._lock:
                self._pending_count += 1
                generation = self._generation
            f.client.on_done(f, functools.partial(self._done, f, generation))

    def add(self, future: Future) -> None:
        """Add one future."""
        self.update((future,))

    def _done(self, future: Future, generation: int) -> None:
        with self._cond:
            if generation != self._generation:  # cleared since
                return
            self._pending_count -= 1
            self._ready.append(future)
            self._cond.notify_all()
        event = self._async_event
        if event is not None:
            self._async_event = None
            event.set()

    # -- state -----------------------------------------------------------------------

    def count(self) -> int:
        """Futures not yet yielded (running or done)."""
        with self._lock:
            return self._pending_count + len(self._ready)

    def is_empty(self) -> bool:
        return not self.count()

    def has_ready(self) -> bool:
        return bool(self._ready)

    def clear(self) -> None:
        """Forget every future, pending or ready."""
        with self._lock:
            self._generation += 1
            self._pending_count = 0
            self._ready.clear()

    def __repr__(self) -> str:
        return f"<as_completed: waiting={self._pending_count} done={len(self._ready)}>"

    # -- sync iteration --------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._async_futures:
            raise TypeError("futures of an asynchronous Client: use 'async for' on as_completed")
        with self._cond:
            while not self._ready:
                if self._pending_count <= 0:
                    raise StopIteration
                if not self._cond.wait(timeout=self._remaining()):
                    if not self._ready:
                        raise TimeoutError(
                            f"as_completed: nothing completed within {self.timeout} s"
                        )
            future = self._ready.popleft()
        return self._with_result(future) if self.with_results else future

    next = __next__

    def _remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def _with_result(self, future: Future) -> tuple[Future, Any]:
        if future.status == "error":
            exc = future.exception()
            if self.raise_errors:
                raise exc
            return future, exc
        return future, future.result()

    def next_batch(self, block: bool = True) -> list[Any]:
        """Every ready future (at least one if ``block``)."""
        batch = [next(self)] if block else []
        while True:
            with self._lock:
                if not self._ready:
                    break
                future = self._ready.popleft()
            batch.append(self._with_result(future) if self.with_results else future)
        return batch

    def batches(self) -> Iterator[list[Any]]:
        """Yield lists of whatever has completed, as soon as something has."""
        while True:
            try:
                yield self.next_batch(block=True)
            except StopIteration:
                return

    # -- async iteration (asynchronous clients) ----------------------------------------

    def __aiter__(self) -> as_completed:
        return self

    def __anext__(self) -> Any:
        if self._sync_futures:
            raise TypeError("futures of a sync Client: use a plain 'for' on as_completed")
        if self._async_client is None:
            return self._anext()
        return self._async_client.sync(self._anext)  # under asyncio: in the client's loop

    async def _anext(self) -> Any:
        with trio.move_on_after(float("inf") if self.timeout is None else self.timeout):
            while not self._ready:
                if self._pending_count <= 0:
                    raise StopAsyncIteration
                if self._async_event is None:
                    self._async_event = trio.Event()
                await self._async_event.wait()
        if not self._ready:
            raise TimeoutError(f"as_completed: nothing completed within {self.timeout} s")
        future = self._ready.popleft()
        if not self.with_results:
            return future
        if future.status == "error":
            exc = await future._exception()
            if self.raise_errors:
                assert exc is not None
                raise exc
            return future, exc
        return future, await future._result()
