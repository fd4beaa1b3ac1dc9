"""A worker's actors: stateful objects that live on the worker that made them.

``client.submit(Cls, actor=True)`` runs ``ActorConstructor(Cls, proxy)`` as an ordinary
task: it builds the instance, keeps it here under the task's key, and returns a small
proxy (``client/actors.Actor``: the class, this worker's address, the key) as the task's
value. So the task core, transfers, gather and dependents see only the proxy, and no
change to either core was needed; the instance itself never leaves this process.

Method calls and attribute reads come straight from the proxy to this worker's data
server (``actor_execute``, ``actor_attribute``), not through the scheduler. Plain methods
run one at a time, in arrival order, on a thread of their own (dask's single actor
thread), so an actor's state needs no locks; ``async def`` methods run on the worker's
loop. Arguments and results travel pickled (``cloudpickle``): a result that cannot be
pickled is an error reply naming it, not a broken connection. When the worker drops the
proxy's key (the key was released), the instance goes too.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import cloudpickle
import trio

from trioscheduler.server import task_context
from trioscheduler.wire import busy_poll
from trioscheduler.wire.remote_error import pack_exception

if TYPE_CHECKING:
    from trioscheduler.server.worker import Worker

__all__ = ["ActorConstructor", "ActorHost"]


class ActorConstructor:
    """The task behind ``submit(Cls, actor=True)``: ``Cls(*args)`` kept on this worker,
    ``proxy(Cls, address, key)`` returned as the task's value."""

    __slots__ = ("cls", "proxy")

    def __init__(self, cls: type, proxy: Callable[[type, str, Any], Any]) -> None:
        self.cls = cls
        self.proxy = proxy

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        worker = task_context.get_worker()
        key = task_context.get_task_key()
        worker.actors.instances[key] = self.cls(*args, **kwargs)
        return self.proxy(self.cls, worker.address, key)

    def __reduce__(self) -> Any:
        return (type(self), (self.cls, self.proxy))


def _error(exc: BaseException) -> dict[str, Any]:
    blob, tb_blob, text, _ = pack_exception(exc)
    return {"status": "error", "exception": blob, "traceback": tb_blob, "text": text}


class ActorHost:
    """``key -> instance`` for one worker, and the two requests that reach them."""

    __slots__ = ("instances", "thread", "worker")

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.instances: dict[Any, Any] = {}
        self.thread = trio.CapacityLimiter(1)  # one actor method at a time, as dask's

    def forget(self, key: Any) -> None:
        self.instances.pop(key, None)

    def _instance(self, request: dict[str, Any]) -> Any:
        key = request.get("key")
        try:
            return self.instances[key]
        except (KeyError, TypeError):
            raise ValueError(
                f"no actor {key!r} on worker {self.worker.address}: its key was released, "
                "or the worker that held it was restarted"
            ) from None

    async def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """``actor_execute`` or ``actor_attribute``; the result pickled, or an error."""
        try:
            actor = self._instance(request)
            if request["op"] == "actor_attribute":
                value = getattr(actor, str(request.get("attribute")))
            else:
                value = await self._call(actor, request)
        except trio.Cancelled:
            raise
        except Exception as exc:
            return _error(exc)
        try:
            blob = cloudpickle.dumps(value, protocol=5)
        except Exception as exc:
            return _error(TypeError(f"the actor's result {value!r:.100} cannot be pickled: {exc}"))
        return {"status": "OK", "result": blob}

    async def _call(self, actor: Any, request: dict[str, Any]) -> Any:
        method = getattr(actor, str(request.get("method")))
        args, kwargs = cloudpickle.loads(request["args"])
        worker = self.worker
        if inspect.iscoroutinefunction(method):
            token = task_context.current_worker.set(worker)
            try:
                return await method(*args, **kwargs)
            finally:
                task_context.current_worker.reset(token)

        def run() -> Any:
            token = task_context.current_worker.set(worker)
            try:
                return method(*args, **kwargs)
            finally:
                task_context.current_worker.reset(token)

        with busy_poll.thread_at_work():  # the loop holds no GIL the method wants
            return await trio.to_thread.run_sync(run, limiter=self.thread)
