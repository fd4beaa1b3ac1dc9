"""``client.get_executor()``: the client as a ``concurrent.futures.Executor``.

Code written against the standard library's executors (``submit``/``map``/``shutdown``,
``concurrent.futures.wait`` and ``as_completed``) runs on the cluster unchanged. The
standard functions read the internals of ``concurrent.futures.Future``, so each cluster
future is mirrored into one: its outcome is copied over when it is done (a done-callback,
run off the loop), and cancelling the standard future cancels the task.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from trioscheduler.client.base import ClientBase
from trioscheduler.client.futures import Future

__all__ = ["ClientExecutor", "ExecutorMethods"]

_ALLOWED = frozenset({"pure", "workers", "resources", "allow_other_workers", "retries"})


def _mirror(future: Future) -> cf.Future[Any]:
    """A standard-library future that follows ``future``.

    Copied in the client's loop thread as soon as the key is done when the outcome is
    at hand there (a small result the scheduler pushed, an error, a cancellation); a
    result that must be fetched is fetched from a thread (``add_done_callback``).
    """
    out: cf.Future[Any] = cf.Future()
    out.set_running_or_notify_cancel()

    def copy(f: Future) -> None:  # a thread: may block on the fetch
        if out.done():
            return
        try:
            out.set_result(f.result())
        except BaseException as exc:
            out.set_exception(exc)

    def settle() -> None:  # the loop thread
        st = future._state
        if out.done():
            return
        if st.status == "finished":
            if st.held is not None:
                out.set_result(st.held[0])
            else:
                future.add_done_callback(copy)
        elif st.status == "cancelled":
            # A running cf.Future cannot be marked cancelled; wait() wakes on an exception.
            out.set_exception(cf.CancelledError(f"the task {future.key!r} was cancelled"))
        else:
            out.set_exception(st.exception() or RuntimeError(f"{future.key!r}: {st.status}"))

    future.client.on_done(future, settle)
    return out


class ClientExecutor(cf.Executor):
    """Runs ``submit``/``map`` calls on a ``Client``; ``**kwargs`` go to every submit."""

    def __init__(self, client: Any, **kwargs: Any) -> None:
        unknown = set(kwargs) - _ALLOWED
        if unknown:
            raise TypeError(
                f"unsupported arguments to get_executor(): {sorted(unknown)}; "
                f"it takes {sorted(_ALLOWED)}"
            )
        self._client = client
        self._kwargs = kwargs
        self._futures: weakref.WeakSet[Future] = weakref.WeakSet()
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        """``fn(*args, **kwargs)`` on the cluster; a ``concurrent.futures.Future``."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        future = self._client.submit(fn, *args, **{**self._kwargs, **kwargs})
        self._futures.add(future)
        return _mirror(future)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """Results of ``fn`` over the zipped iterables, in order (all submitted at once).

        ``chunksize`` is ignored, as in dask (every call is its own task). Leaving the
        iterator early cancels the calls not yet read.
        """
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        end = None if timeout is None else time.monotonic() + timeout
        futures = self._client.map(fn, *iterables, **self._kwargs)
        self._futures.update(futures)

        def results() -> Iterator[Any]:
            i = 0
            try:
                for i, f in enumerate(futures):  # noqa: B007
                    left = None if end is None else max(0.0, end - time.monotonic())
                    try:
                        yield f.result(left)
                    except TimeoutError as exc:
                        raise cf.TimeoutError(str(exc)) from exc
                i = len(futures)
            finally:
                rest = futures[i + 1 :] if i < len(futures) else []
                if rest and self._client.status == "running":
                    self._client.cancel(rest)

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new calls; ``wait`` for the running ones, or ``cancel_futures`` them."""
        if self._shutdown:
            return
        self._shutdown = True
        futures = list(self._futures)
        if not futures or self._client.status != "running":
            return
        if cancel_futures or not wait:
            self._client.cancel(futures)
            return
        from trioscheduler.client.futures import wait as wait_futures

        wait_futures(futures)


class ExecutorMethods(ClientBase):
    """``Client.get_executor`` (mixed into ``Client``)."""

    def get_executor(self, **kwargs: Any) -> ClientExecutor:
        """A ``concurrent.futures.Executor`` that runs calls on this client;
        ``kwargs`` (``pure``, ``workers``, ``resources``, ``allow_other_workers``,
        ``retries``) apply to every call."""
        return ClientExecutor(self, **kwargs)
