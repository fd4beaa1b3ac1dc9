"""What a running task sees of its worker: ``get_worker``, ``get_task_key``, ``secede``.

The worker core decides *when* a task runs (thread slots, resources, pause); the worker's
task threads (``_executor``) run plain functions, ``async def`` functions run on the
worker's loop. A ``CapacityLimiter`` of ``nthreads`` slots, held per task key, backs the
core's own slot count, and a task that calls ``secede()`` hands its slot back so the
core can start another task while it waits (tasks that launch tasks).

Inside a task, ``get_worker()`` returns the worker running it and ``get_task_key()``
its key: both are context variables, set in the task thread (or the task's trio task),
so several workers in one process never see each other's tasks.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING, Any

import trio

from trioscheduler.errors import TrioSchedulerError

if TYPE_CHECKING:
    from trioscheduler.server.worker import Worker

current_worker: contextvars.ContextVar[Worker | None] = contextvars.ContextVar(
    "trioscheduler_worker", default=None
)
current_key: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "trioscheduler_task_key", default=None
)
# set while a quick task runs on the worker's loop thread (``quick_tasks``)
on_loop: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "trioscheduler_task_on_loop", default=False
)


class Reschedule(TrioSchedulerError):
    """Raise inside a task to hand it back to the scheduler, which places it again."""


class RunInThread(BaseException):  # noqa: N818 - a signal to the worker, not an error
    """A task running on the worker's loop thread (``quick_tasks``) asked for something
    only a task thread can do (``secede``, a client): the worker runs it again in a
    thread. A ``BaseException``, so that ``except Exception`` in the task lets it pass."""


def check_thread(what: str) -> None:
    """Raise ``RunInThread`` if the calling task runs on the worker's loop thread."""
    if on_loop.get():
        raise RunInThread(f"{what} needs a task thread")


def get_worker() -> Worker:
    """The worker running the current task (inside a task, or a worker's ``run`` call)."""
    worker = current_worker.get()
    if worker is None:
        raise ValueError("get_worker() was called outside of a task running on a worker")
    return worker


def get_task_key() -> Any:
    """The key of the task running in this thread or trio task, or ``None`` outside one."""
    return current_key.get()


def secede() -> None:
    """Leave the worker's thread pool: the task keeps running, its slot goes to another.

    For tasks that wait on other tasks (``worker_client``); without it, tasks waiting on
    their own sub-tasks can fill every slot and deadlock the worker.
    """
    check_thread("secede()")
    worker = get_worker()
    key = current_key.get()
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        # in a task thread
        trio.from_thread.run_sync(worker.secede, key, trio_token=worker.trio_token)
    else:
        worker.secede(key)  # an async task on the worker's loop


class TaskRunner:
    """One worker's thread slots: ``nthreads``, held per running key, minus seceded tasks."""

    __slots__ = ("slots", "worker")

    def __init__(self, worker: Worker, nthreads: int) -> None:
        self.worker = worker
        self.slots = trio.CapacityLimiter(max(1, nthreads))

    def release(self, key: Any) -> None:
        """Give back ``key``'s slot (it seceded or finished); no-op if it has none."""
        try:
            self.slots.release_on_behalf_of(key)
        except RuntimeError:
            pass
