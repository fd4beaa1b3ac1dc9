"""Tasks that launch tasks: ``get_client``, ``worker_client``, ``secede``, ``rejoin``.

A task runs in a thread of its worker's trio loop. The client it gets from
``get_client()`` is a sync ``Client`` whose session lives in *that* loop (one client per
worker, made on first use and closed with the worker), not in the process-wide
background loop: so it can reach an ``inproc://`` scheduler of the same trio run, and it
goes away with its worker.

A task that waits for the tasks it launched must leave the worker's thread pool while
it waits, or tasks waiting on sub-tasks fill every slot and the worker deadlocks.
``worker_client()`` does both: it secedes (the slot goes to another task, the scheduler
learns the task is long-running) and, on exit, rejoins (waits for a free slot, so the
worker never runs more than ``nthreads`` tasks at a time for long).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from trioscheduler.deploy.loop import Entered, LoopError
from trioscheduler.server import task_context
from trioscheduler.server.task_context import get_task_key, get_worker, secede

if TYPE_CHECKING:
    from trioscheduler.client.client import Client
    from trioscheduler.server.worker import Worker

__all__ = [
    "get_client",
    "get_task_key",
    "get_worker",
    "local_client",
    "rejoin",
    "secede",
    "worker_client",
]

T = TypeVar("T")

_clients: weakref.WeakKeyDictionary[Worker, Client] = weakref.WeakKeyDictionary()
_clients_lock = threading.Lock()
# the asynchronous client of each worker's async tasks (``worker_async_client``), or the
# event its first caller sets once it is running
_async_clients: weakref.WeakKeyDictionary[Worker, Client | trio.Event] = weakref.WeakKeyDictionary()


class WorkerLoop:
    """The worker's trio loop seen as a ``LoopRunner``: what a sync ``Client`` runs on.

    ``run`` crosses into the loop from a task thread; ``enter`` holds the client's
    session open in the worker's cancellable work nursery (closed with the worker).
    """

    def __init__(self, token: trio.lowlevel.TrioToken, nursery: trio.Nursery) -> None:
        self._token = token
        self._nursery = nursery

    def run(self, async_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            pass
        else:
            raise LoopError(
                "the worker's client is blocking and was called from an async task on the "
                "worker's own loop; use Client(get_worker().scheduler_address, "
                "asynchronous=True) in async tasks"
            )
        try:
            return trio.from_thread.run(async_fn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            raise LoopError("the worker's trio loop has shut down") from None

    def enter(self, cm: AbstractAsyncContextManager[T], name: str = "") -> Entered[T]:
        handle: Entered[T] = Entered(self, name)  # type: ignore[arg-type]

        async def start() -> T:
            value: T = await self._nursery.start(_hold, cm, handle)
            return value

        handle.value = self.run(start)
        return handle


async def _hold(
    cm: AbstractAsyncContextManager[T],
    handle: Entered[T],
    *,
    task_status: trio.TaskStatus[T] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep ``cm`` open until ``handle`` closes or the worker's work is cancelled.

    Either way the client closes in order (shielded: releases its keys, says goodbye)
    instead of having its background tasks cancelled under it.
    """

    async def watch() -> None:
        try:
            await trio.sleep_forever()
        finally:
            handle._closing.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            with trio.CancelScope(shield=True):
                async with cm as value:
                    task_status.started(value)
                    await handle._closing.wait()
            nursery.cancel_scope.cancel()
    finally:
        handle._done.set()


def get_client(timeout: float | None = None) -> Client:
    """The client to submit work with: the worker's own inside a task, else the default.

    Inside a task, futures made with it may be passed to and returned from other tasks
    of the same cluster. ``timeout`` bounds connecting to the scheduler.
    """
    from trioscheduler.client.client import Client, default_client

    try:
        worker = get_worker()
    except ValueError:
        return default_client()
    task_context.check_thread("get_client()")
    if _in_trio():
        raise LoopError(
            "get_client() inside an async task: its client would block the worker's loop; "
            "use 'async with Client(get_worker().scheduler_address, asynchronous=True)'"
        )
    with _clients_lock:
        client = _clients.get(worker)
        if client is not None and client.status == "running":
            return client
        if worker._work is None or worker.status != "running":
            raise RuntimeError(f"{worker!r} is not running: it cannot make a client")
        loop = WorkerLoop(worker_token(worker), worker._work)
        client = Client(
            worker.scheduler_address,
            timeout=worker.connect_timeout if timeout is None else timeout,
            set_as_default=False,
            name=f"worker-client-{worker.address}",
            security=worker.security and worker.security.acting_as("client", "worker"),
            _loop=loop,
        )
        _clients[worker] = client
        return client


async def worker_async_client() -> Client:
    """The asynchronous client of ``async def`` tasks on this worker (``get_client()``'s
    counterpart there, which would block the loop): one per worker, made on first use in
    the worker's loop and closed with the worker. The coordination primitives use it
    when no client is given."""
    from trioscheduler.client.client import Client

    worker = get_worker()
    while True:
        held = _async_clients.get(worker)
        if isinstance(held, trio.Event):
            await held.wait()  # another async task is making it
            continue
        if held is not None and held.status == "running":
            return held
        break
    if worker._work is None or worker.status != "running":
        raise RuntimeError(f"{worker!r} is not running: it cannot make a client")
    ready = _async_clients[worker] = trio.Event()
    try:
        client = Client(
            worker.scheduler_address,
            timeout=worker.connect_timeout,
            asynchronous=True,
            set_as_default=False,
            name=f"worker-async-client-{worker.address}",
            security=worker.security and worker.security.acting_as("client", "worker"),
        )
        # held in the worker's work nursery, closed when that is cancelled (never by
        # handle.close(), which would need a runner)
        handle: Entered[Client] = Entered(None, "worker async client")  # type: ignore[arg-type]
        await worker._work.start(_hold, client, handle)
        _async_clients[worker] = client
        return client
    finally:
        if _async_clients.get(worker) is ready:
            del _async_clients[worker]
        ready.set()


def in_async_task() -> bool:
    """Inside an ``async def`` task (or ``run`` call) on a worker's own loop. (A plain
    task running on the loop is neither: it is sent to a thread, ``RunInThread``.)"""
    try:
        get_worker()
    except ValueError:
        return False
    task_context.check_thread("a client")
    return _in_trio()


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return False
    return True


def worker_token(worker: Worker) -> trio.lowlevel.TrioToken:
    """The trio token of the loop running ``worker`` (from one of its task threads)."""
    token = worker.trio_token
    if token is None:
        raise RuntimeError(f"{worker!r} is not running: it has no trio loop")
    return token


def rejoin() -> None:
    """Come back into the worker's thread pool after ``secede()``: wait for a free slot.

    The slot is given back when the task ends. Does nothing outside a seceded task.
    """
    task_context.check_thread("rejoin()")
    worker = get_worker()
    key = get_task_key()
    slots = worker.runner.slots

    async def acquire() -> None:
        try:
            await slots.acquire_on_behalf_of(key)
        except RuntimeError:  # it holds its slot already: it never seceded
            pass

    if _in_trio():
        raise LoopError("rejoin() blocks; call it from a task running in a worker thread")
    trio.from_thread.run(acquire, trio_token=worker.trio_token)


@contextmanager
def worker_client(timeout: float | None = None, separate_thread: bool = True) -> Iterator[Client]:
    """``with worker_client() as client:`` -- submit and wait for tasks from inside a task.

    Secedes from the worker's thread pool for the duration of the block (unless
    ``separate_thread=False``) and rejoins at its end.
    """
    client = get_client(timeout)
    if separate_thread:
        secede()
    try:
        yield client
    finally:
        if separate_thread:
            rejoin()


local_client = worker_client
"""The seed's name for ``worker_client``."""
