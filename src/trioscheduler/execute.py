"""Running tasks: plain functions in worker threads, ``async def`` functions on the loop.

The worker core decides *when* a task runs (thread slots, resources, pause); this module
only runs it and reports how it went. Each task runs in a thread from trio's thread
cache; a ``CapacityLimiter`` of ``nthreads`` slots, held per task key, backs the core's
own slot count, and a task that calls ``secede()`` hands its slot back so the core can
start another task while it waits (tasks that launch tasks).

Inside a task, ``get_worker()`` returns the worker running it and ``get_task_key()``
its key: both are context variables, which trio copies into the thread it runs the task
in, so several workers in one process never see each other's tasks.
"""

from __future__ import annotations

import contextvars
import inspect
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import trio
from dask.sizeof import sizeof
from dask.utils import typename

from trioscheduler import runspec
from trioscheduler.errors import TrioSchedulerError

if TYPE_CHECKING:
    from trioscheduler.worker import Worker

_worker: contextvars.ContextVar[Worker | None] = contextvars.ContextVar(
    "trioscheduler_worker", default=None
)
_key: contextvars.ContextVar[Any] = contextvars.ContextVar("trioscheduler_task_key", default=None)


class Reschedule(TrioSchedulerError):
    """Raise inside a task to hand it back to the scheduler, which places it again."""


def get_worker() -> Worker:
    """The worker running the current task (inside a task, or a worker's ``run`` call)."""
    worker = _worker.get()
    if worker is None:
        raise ValueError("get_worker() was called outside of a task running on a worker")
    return worker


def get_task_key() -> Any:
    """The key of the task running in this thread or trio task, or ``None`` outside one."""
    return _key.get()


def secede() -> None:
    """Leave the worker's thread pool: the task keeps running, its slot goes to another.

    For tasks that wait on other tasks (``worker_client``); without it, tasks waiting on
    their own sub-tasks can fill every slot and deadlock the worker.
    """
    worker = get_worker()
    key = _key.get()
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        trio.from_thread.run_sync(worker._secede, key)  # in a task thread
    else:
        worker._secede(key)  # an async task on the worker's loop


class Outcome:
    """How one run went: ``value`` or ``exception``, with wall-clock start and stop."""

    __slots__ = ("exception", "rescheduled", "start", "stop", "value")

    def __init__(self) -> None:
        self.value: Any = None
        self.exception: BaseException | None = None
        self.rescheduled = False
        self.start = 0.0
        self.stop = 0.0

    @property
    def ok(self) -> bool:
        return self.exception is None and not self.rescheduled

    def nbytes_and_type(self) -> tuple[int, str]:
        """Size (``dask.sizeof``) and type name of the value, as the scheduler records them."""
        try:
            nbytes = int(sizeof(self.value))
        except Exception:
            nbytes = 0
        return nbytes, typename(type(self.value))


class _Async:
    """A run spec that turned out to be a coroutine function: run it on the loop."""

    __slots__ = ("args", "func", "kwargs")

    def __init__(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.func, self.args, self.kwargs = func, args, kwargs


def _run_sync(run_spec: bytes, data: Mapping[Any, Any], out: Outcome) -> _Async | None:
    out.start = time.time()
    try:
        func, args, kwargs = runspec.unpack(run_spec, data)
        if inspect.iscoroutinefunction(func):
            return _Async(func, args, kwargs)
        out.value = func(*args, **kwargs)
    except Reschedule:
        out.rescheduled = True
    except BaseException as exc:  # a task's SystemExit must not take the worker down
        out.exception = exc
    out.stop = time.time()
    return None


class TaskRunner:
    """Runs run specs for one worker, ``nthreads`` at a time (minus seceded tasks)."""

    __slots__ = ("_threads", "slots", "worker")

    def __init__(self, worker: Worker, nthreads: int) -> None:
        self.worker = worker
        self.slots = trio.CapacityLimiter(max(1, nthreads))
        # The slot limiter above is the real bound; this one only lifts trio's default
        # cap of 40 threads, which seceded tasks could otherwise reach.
        self._threads = trio.CapacityLimiter(math.inf)

    async def run(self, key: Any, run_spec: bytes, data: Mapping[Any, Any]) -> Outcome:
        """Run one task with its dependencies looked up in ``data``; never raises."""
        out = Outcome()
        await self.slots.acquire_on_behalf_of(key)
        token_w = _worker.set(self.worker)
        token_k = _key.set(key)
        try:
            pending = await trio.to_thread.run_sync(
                _run_sync, run_spec, data, out, limiter=self._threads, abandon_on_cancel=True
            )
            if pending is not None:
                try:
                    out.value = await pending.func(*pending.args, **pending.kwargs)
                except Reschedule:
                    out.rescheduled = True
                except trio.Cancelled:
                    raise
                except BaseException as exc:
                    out.exception = exc
                out.stop = time.time()
        finally:
            _worker.reset(token_w)
            _key.reset(token_k)
            self.release(key)
        return out

    def release(self, key: Any) -> None:
        """Give back ``key``'s slot (it seceded or finished); no-op if it has none."""
        try:
            self.slots.release_on_behalf_of(key)
        except RuntimeError:
            pass
