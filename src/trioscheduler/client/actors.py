"""Actors, the client's side: ``Actor`` proxies and the ``ActorFuture``s their calls return.

``client.submit(Cls, actor=True)`` is an ordinary task (``server/actors.ActorConstructor``)
whose value is an ``Actor``: the class, the address of the worker holding the instance,
and the key. Calling a method sends ``actor_execute`` straight to that worker over the
client's connection pool (no scheduler hop) and returns an ``ActorFuture`` at once: the
call runs in the background, ``.result()`` blocks for it (sync client) and ``await``
waits for it (asynchronous client). Reading an attribute asks the worker too, blocking or
awaitable as the client is. An ``Actor`` finds its client late, as the coordination
primitives do: the worker's own inside a task, else the default client.
"""

from __future__ import annotations

import abc
import functools
import pickle
import threading
import time
from collections.abc import Awaitable, Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import cloudpickle
import trio

from trioscheduler.client.futures import Future
from trioscheduler.client.worker_client import get_client, in_async_task, worker_async_client
from trioscheduler.errors import TrioSchedulerError
from trioscheduler.server import task_context
from trioscheduler.server.actors import ActorConstructor
from trioscheduler.wire.remote_error import unpack_exception

if TYPE_CHECKING:
    from trioscheduler.client.client import Client

__all__ = ["Actor", "ActorFuture", "BaseActorFuture", "as_actor", "hold_actors"]

T = TypeVar("T")
_POLL = 0.25  # seconds between checks that the client still runs while a thread waits


def as_actor(cls: Any) -> ActorConstructor:
    """The task function for ``submit(cls, ..., actor=True)``."""
    if not isinstance(cls, type):
        raise TypeError(f"actor=True needs a class to instantiate on a worker, got {cls!r:.100}")
    return ActorConstructor(cls, Actor)


def hold_actors(client: Any, values: dict[Any, Any]) -> None:
    """Fetched values that are ``Actor``s hold a future of their key, as dask's do: the
    instance lives as long as the user keeps the handle, even once the future that made
    it is gone (``gather(map(Cls, ..., actor=True))``)."""
    for key, value in values.items():
        if type(value) is Actor and value._future is None:
            value._client = client
            value._future = Future(key, client)


class Actor:
    """A handle on an object living on one worker: ``counter.increment()`` runs there and
    returns an ``ActorFuture``; ``counter.n`` reads the attribute there."""

    def __init__(self, cls: type, address: str, key: Any, worker: Any = None) -> None:
        self._cls = cls
        self._address = address
        self.key = key
        self._client: Client | None = None
        # Set once the client fetched it (``hold_actors``); on workers a handle holds
        # nothing, or the worker holding the value would keep its own key wanted.
        self._future: Future | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = get_client()
        return self._client

    def __reduce__(self) -> Any:
        return (Actor, (self._cls, self._address, self.key))

    def __repr__(self) -> str:
        return f"<Actor: {self._cls.__name__}, key={self.key}>"

    def __dir__(self) -> list[str]:
        return sorted(set(dir(type(self))) | {a for a in dir(self._cls) if not a.startswith("_")})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        attr = getattr(self._cls, name, None)
        if callable(attr):

            @functools.wraps(attr)
            def call(*args: Any, **kwargs: Any) -> ActorFuture[Any]:
                try:
                    payload = cloudpickle.dumps((args, kwargs), protocol=5)
                except Exception as exc:
                    raise TypeError(
                        f"the arguments of {self._cls.__name__}.{name}() cannot be pickled: {exc}"
                    ) from exc
                msg = {"op": "actor_execute", "key": self.key, "method": name, "args": payload}
                if self._client is None and in_async_task():  # on the worker's loop
                    return ActorFuture(None, self._ask_from_async_task, msg)
                return ActorFuture(self.client, self._ask, msg)

            return call
        msg = {"op": "actor_attribute", "key": self.key, "attribute": name}
        if self._client is None and in_async_task():
            return self._ask_from_async_task(msg)
        return self.client.sync(self._ask, msg)

    async def _ask_from_async_task(self, msg: dict[str, Any]) -> Any:
        """In an ``async def`` task: through the worker's asynchronous client."""
        if self._client is None:
            self._client = await worker_async_client()
        return await self._ask(msg)

    async def _ask(self, msg: dict[str, Any]) -> Any:
        """One request to the worker holding the instance; its result, or its error raised."""
        try:
            async with self.client.worker_connection(self._address) as stream:
                await stream.send(msg)
                reply = await stream.receive()
        except (
            OSError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.EndOfChannel,
        ) as exc:
            raise TrioSchedulerError(
                f"could not reach worker {self._address} holding actor {self.key!r} "
                f"(the worker may have died: the actor is lost): {exc!r}"
            ) from exc
        if reply.get("status") != "OK":
            if "exception" in reply:
                raise unpack_exception(reply["exception"], reply["traceback"], reply["text"])
            raise TrioSchedulerError(f"worker {self._address}: {reply.get('text')}")
        return pickle.loads(reply["result"])


class BaseActorFuture(abc.ABC, Awaitable[T]):
    """The result of an actor's method call: ``result()``, ``done()``, ``await``."""

    @abc.abstractmethod
    def result(self, timeout: Any = None) -> T: ...

    @abc.abstractmethod
    def done(self) -> bool: ...

    def __repr__(self) -> str:
        return "<ActorFuture>"


class ActorFuture(BaseActorFuture[T], Generic[T]):
    """A call already on its way: started in the client's loop when made (``client`` is
    ``None`` in an ``async def`` task: then in the worker's loop, awaited there)."""

    def __init__(self, client: Client | None, ask: Any, msg: dict[str, Any]) -> None:
        self._client = client
        self._outcome: tuple[bool, Any] | None = None
        self._ready = threading.Event()  # for a thread blocking in result()
        self._event = trio.Event()  # for a task awaiting it in the loop

        async def run() -> None:
            try:
                self._outcome = (True, await ask(msg))
            except Exception as exc:
                self._outcome = (False, exc)
            finally:
                self._event.set()
                self._ready.set()

        def closed() -> None:  # in the loop thread
            what = "the worker" if client is None else repr(client)
            self._outcome = (False, TrioSchedulerError(f"{what} is closed"))
            self._event.set()
            self._ready.set()

        if client is not None:
            client.start_soon(run, closed)
            return
        nursery = task_context.get_worker()._work
        if nursery is None:
            closed()
        else:
            nursery.start_soon(run)

    def done(self) -> bool:
        return self._ready.is_set()

    def _unwrap(self) -> T:
        assert self._outcome is not None
        ok, value = self._outcome
        if not ok:
            raise value
        result: T = value
        return result

    def result(self, timeout: Any = None) -> T:
        """Block until the call returned (``TimeoutError`` after ``timeout`` seconds)."""
        if self._client is None or self._client.asynchronous:
            raise RuntimeError(
                "this ActorFuture belongs to an asynchronous client or an async task: "
                "'await fut' instead"
            )
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        while not self._ready.wait(
            _POLL if deadline is None else min(_POLL, max(0.0, deadline - time.monotonic()))
        ):
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"the actor call was not done after {timeout} s")
            if self._client.status != "running":
                raise TrioSchedulerError(f"{self._client!r} closed before the actor call returned")
        return self._unwrap()

    def __await__(self) -> Generator[Any, None, T]:
        async def wait() -> T:
            await self._event.wait()
            return self._unwrap()

        client = self._client
        if client is not None and client.asynchronous:  # under asyncio: in the client's loop
            awaitable: Any = client.sync(wait)
            return awaitable.__await__()  # type: ignore[no-any-return]
        return wait().__await__()
