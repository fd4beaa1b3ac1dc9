"""``Lock``, ``Semaphore``, ``MultiLock``, ``Event``, ``Variable``, ``Queue``: dask's
coordination primitives, kept by the scheduler (``server/coordination.py`` hosting the
pure ``core/coordination.py``).

Each object is a name plus a way to reach the scheduler, found late (as dask's): the
client given, else inside a task the worker's own client (``get_client()``, so a task's
lease is tied to its worker: if the worker dies, the lease returns at once), else the
default client. Methods block with a sync client and return awaitables with an
asynchronous one. Objects pickle as their name, so a task can be handed a ``Lock`` and
use it on its worker.

Values of variables and queues are pickled here, with futures as references to their
keys (``client/datasets.py``'s ``pack``): the scheduler keeps the bytes unopened and
keeps the keys in memory while a variable or queue holds them. A value that cannot be
pickled is refused here with a ``TypeError``; nothing is sent.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dask.utils import parse_timedelta

from trioscheduler.client import datasets
from trioscheduler.client.worker_client import get_client, in_async_task, worker_async_client
from trioscheduler.errors import TrioSchedulerError
from trioscheduler.server import task_context

if TYPE_CHECKING:
    from trioscheduler.client.client import Client

__all__ = ["Event", "Lock", "MultiLock", "Queue", "Semaphore", "Variable"]

_ERRORS: dict[str, type[Exception]] = {
    "TimeoutError": TimeoutError,
    "ValueError": ValueError,
    "RuntimeError": RuntimeError,
}


def _seconds(timeout: Any) -> float | None:
    """dask's timeouts: seconds, ``"200ms"``, a ``timedelta``, or ``None`` (for ever)."""
    if timeout is None:
        return None
    value = parse_timedelta(timeout, default="s")
    if value is None:
        return None
    if value < 0:
        raise ValueError(f"timeout must not be negative, got {timeout!r}")
    return float(value)


def _no_backend(scheduler_rpc: Any, loop: Any, what: str) -> None:
    if scheduler_rpc is not None or loop is not None:
        raise TypeError(
            f"{what}(scheduler_rpc=, loop=) are dask internals trioscheduler has no use for; "
            f"pass client= (or nothing: the default client, or the worker's inside a task)"
        )


def _no_extra(kwargs: dict[str, Any], what: str) -> None:
    if kwargs:
        raise TypeError(f"{what}() got unexpected keyword arguments {sorted(kwargs)}")


def _blocking_timeout(blocking: bool, timeout: Any) -> Any:
    """dask's ``acquire(blocking=False)``: a timeout of 0 (and no timeout of its own)."""
    if blocking:
        return timeout
    if timeout is not None:
        raise ValueError("can't specify a timeout for a non-blocking call")
    return 0


class _Primitive:
    """The shared plumbing: the late-bound client and one request to the scheduler."""

    _kind = "primitive"

    def __init__(self, name: str | None, client: Client | None) -> None:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"{type(self).__name__} name must be a str, got {name!r:.100}")
        self.name = name or f"{self._kind}-{uuid.uuid4().hex}"
        self._client = client

    @property
    def client(self) -> Client:
        if self._client is None:
            try:
                self._client = get_client()
            except ValueError:
                raise ValueError(
                    f"{type(self).__name__}({self.name!r}) has no client: create a Client "
                    "first, or pass client="
                ) from None
        return self._client

    def _request(
        self,
        kind: str,
        fields: dict[str, Any],
        then: Callable[[Any], Any] | None = None,
        hold: Any = None,
    ) -> Any:
        """One request; the reply value (through ``then``); blocking or awaitable as the
        client is. Inside a task the request names its worker (leases tied to it).

        ``hold`` (a value put in a variable or queue) is kept referenced until the reply:
        its futures must not be released before the scheduler holds their keys.
        """
        if self._client is None and in_async_task():
            return self._request_from_async_task(kind, fields, then, hold)
        client = self.client
        worker = task_context.current_worker.get()
        op = "coord_wait" if "timeout" in fields else "coord"
        msg = {"op": op, "kind": kind, "worker": worker.address if worker else None, **fields}

        async def go() -> Any:
            reply = await client.rpc(msg)
            if "error" in reply:
                err_kind, text = reply["error"]
                raise _ERRORS.get(err_kind, TrioSchedulerError)(text)
            value = reply["value"]
            del held[:]  # the scheduler holds the keys now
            return value if then is None else await then(value)

        held = [hold]

        return client.sync(go)

    async def _request_from_async_task(
        self, kind: str, fields: dict[str, Any], then: Callable[[Any], Any] | None, hold: Any
    ) -> Any:
        """In an ``async def`` task: through the worker's asynchronous client."""
        self._client = await worker_async_client()
        return await self._request(kind, fields, then, hold)

    def __await__(self) -> Any:
        """``await Lock("x")``, as dask's: nothing to register, the object is ready."""

        async def ready() -> Any:
            return self

        return ready().__await__()

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.name}>"


# -- semaphores and locks ---------------------------------------------------------------


class _Held(_Primitive):
    """``with``/``async with`` around ``acquire()``/``release()`` (sync or async client)."""

    acquire: Callable[..., Any]  # the subclass's
    release: Callable[[], Any]

    def __enter__(self) -> Any:
        self.acquire()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

    async def __aenter__(self) -> Any:
        await self.acquire()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.release()


class Semaphore(_Held):
    """At most ``max_leases`` holders of ``name`` at a time, across the cluster.

    A lease taken inside a task is returned if its worker dies (or its client leaves),
    at once: dask returns it after a 30 s lease timeout. Leases have no timeout
    otherwise: one is held until released or its holder is gone.
    """

    _kind = "semaphore"

    def __init__(
        self,
        max_leases: int = 1,
        name: str | None = None,
        scheduler_rpc: Any = None,
        loop: Any = None,
        *,
        client: Client | None = None,
    ) -> None:
        _no_backend(scheduler_rpc, loop, type(self).__name__)
        if isinstance(max_leases, bool) or not isinstance(max_leases, int) or max_leases < 1:
            raise ValueError(f"max_leases must be an int of at least 1, got {max_leases!r}")
        super().__init__(name, client)
        self.max_leases = max_leases
        self._leases: deque[str] = deque()

    def acquire(self, timeout: Any = None) -> Any:
        """Take a lease: ``True``, or ``False`` if none was free within ``timeout``."""
        lease = uuid.uuid4().hex
        fields = {"name": self.name, "max_leases": self.max_leases, "lease": lease}

        async def keep(granted: bool) -> bool:
            if granted:
                self._leases.append(lease)
            return granted

        return self._request("sem_acquire", {**fields, "timeout": _seconds(timeout)}, keep)

    def release(self) -> Any:
        """Give back this object's oldest lease: ``True``, or ``False`` if the scheduler
        had returned it already (its worker died). ``RuntimeError`` if it holds none."""
        if not self._leases:
            raise RuntimeError(
                f"{type(self).__name__} {self.name!r} released too often: this object holds "
                "no lease (acquire it first)"
            )
        lease = self._leases.popleft()
        return self._request("sem_release", {"name": self.name, "lease": lease})

    def get_value(self) -> Any:
        """How many leases are held now, by anyone."""
        return self._request("sem_value", {"name": self.name})

    def register(self) -> None:
        """dask registers a semaphore before use; here it exists on first acquire."""

    def __reduce__(self) -> Any:
        return (type(self), (self.max_leases, self.name))


class Lock(Semaphore):
    """A cluster-wide lock: ``with Lock("x"): ...`` (a ``Semaphore`` of one lease, sharing
    its names, as dask's)."""

    _kind = "lock"

    def __init__(
        self,
        name: str | None = None,
        scheduler_rpc: Any = None,
        loop: Any = None,
        *,
        client: Client | None = None,
    ) -> None:
        super().__init__(1, name, scheduler_rpc, loop, client=client)

    def acquire(self, blocking: bool = True, timeout: Any = None) -> Any:  # type: ignore[override]
        """``True`` once held; ``False`` if not free within ``timeout`` (or at once, with
        ``blocking=False``)."""
        timeout = _blocking_timeout(blocking, timeout)
        return super().acquire(timeout)

    def release(self) -> Any:
        if not self._leases:
            raise RuntimeError(
                f"Lock {self.name!r} released but not held by this Lock object: acquire it first"
            )
        return super().release()

    def locked(self) -> Any:
        """Whether anyone holds the lock now."""

        async def one(value: int) -> bool:
            return value == 1

        return self._request("sem_value", {"name": self.name}, one)

    def __reduce__(self) -> Any:
        return (type(self), (self.name,))


class MultiLock(_Held):
    """Hold several locks at once (all of ``names``, or ``num_locks`` of them), taken
    atomically so two MultiLocks never deadlock. Its own namespace, apart from ``Lock``."""

    _kind = "multilock"

    def __init__(self, names: list[str] | None = None, client: Client | None = None) -> None:
        names = list(names or [])
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f"MultiLock names must be strs, got {names!r:.100}")
        super().__init__(None, client)
        self.names = names
        self.id = uuid.uuid4().hex
        self._locked = False

    def acquire(
        self, blocking: bool = True, timeout: Any = None, num_locks: int | None = None
    ) -> Any:
        """``True`` once ``num_locks`` (default all) of the names are held by this object."""
        timeout = _blocking_timeout(blocking, timeout)
        if not self.names:
            raise ValueError("MultiLock() has no names to lock")
        n = len(set(self.names)) if num_locks is None else num_locks

        async def keep(granted: bool) -> bool:
            self._locked = granted
            return granted

        fields = {"ident": self.id, "names": self.names, "num_locks": n}
        return self._request("multi_acquire", {**fields, "timeout": _seconds(timeout)}, keep)

    def release(self) -> Any:
        if not self._locked:
            raise ValueError("Lock is not yet acquired")
        self._locked = False
        return self._request("multi_release", {"ident": self.id})

    def locked(self) -> bool:
        return self._locked

    def __reduce__(self) -> Any:
        return (type(self), (self.names,))


# -- events -------------------------------------------------------------------------------


class Event(_Primitive):
    """A cluster-wide flag: ``wait`` until some client or task ``set``s it."""

    _kind = "event"

    def __init__(self, name: str | None = None, client: Client | None = None) -> None:
        super().__init__(name, client)

    def wait(self, timeout: Any = None) -> Any:
        """``True`` once set; ``False`` if not set within ``timeout``."""
        return self._request("event_wait", {"name": self.name, "timeout": _seconds(timeout)})

    def set(self) -> Any:
        return self._request("event_set", {"name": self.name})

    def clear(self) -> Any:
        return self._request("event_clear", {"name": self.name})

    def is_set(self) -> Any:
        return self._request("event_is_set", {"name": self.name})

    def __reduce__(self) -> Any:
        return (type(self), (self.name,))


# -- values: variables and queues -------------------------------------------------------------


def _pack(value: Any, where: str) -> tuple[bytes, list[Any]]:
    try:
        return datasets.pack(value)
    except TypeError as exc:
        cause = exc.__cause__ or exc
        raise TypeError(
            f"cannot put {value!r:.100} in {where}: it cannot be pickled "
            f"({type(cause).__name__}: {cause}); nothing was sent"
        ) from cause


class _Holding(_Primitive):
    async def _unpack(self, reply: list[Any]) -> Any:
        """The value(s) of a reply ``[blob or [blobs], keys, receipt]``; futures in them
        become this client's, then the scheduler may drop its hold (``confirm``)."""
        blob, _keys, receipt = reply
        client = self.client
        if isinstance(blob, list):
            value: Any = [datasets.unpack(b, client) for b in blob]
        else:
            value = datasets.unpack(blob, client)
        if receipt is not None:  # after the futures' desire, on the client's stream
            await client.rpc({"op": "coord", "kind": "confirm", "receipt": receipt})
        return value


class Variable(_Holding):
    """A named value, shared across the cluster: ``set``, ``get`` (waits until set),
    ``delete``. Futures in the value stay computed while the variable holds them."""

    _kind = "variable"

    def __init__(self, name: str | None = None, client: Client | None = None) -> None:
        super().__init__(name, client)

    def set(self, value: Any, timeout: Any = "30 s", **kwargs: Any) -> Any:
        """Replace the value. (``timeout`` is dask's wait for a future's key to reach
        the scheduler; here it always has, since the request follows it on the wire.)"""
        _no_extra(kwargs, "Variable.set")
        _seconds(timeout)  # still checked
        blob, keys = _pack(value, f"Variable {self.name!r}")
        fields = {"name": self.name, "blob": blob, "keys": keys}
        return self._request("var_set", fields, hold=value)

    def get(self, timeout: Any = None, **kwargs: Any) -> Any:
        """The value, waiting until there is one; ``TimeoutError`` after ``timeout``."""
        _no_extra(kwargs, "Variable.get")
        fields = {"name": self.name, "timeout": _seconds(timeout)}
        return self._request("var_get", fields, self._unpack)

    def delete(self) -> Any:
        """Remove the value (for every client); its futures may then be released."""
        return self._request("var_delete", {"name": self.name})

    def __reduce__(self) -> Any:
        return (type(self), (self.name,))


class Queue(_Holding):
    """A cluster-wide FIFO queue, bounded by ``maxsize`` items (0: unbounded)."""

    _kind = "queue"

    def __init__(
        self, name: str | None = None, client: Client | None = None, maxsize: int = 0
    ) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 0:
            raise ValueError(f"maxsize must be an int >= 0, got {maxsize!r}")
        super().__init__(name, client)
        self.maxsize = maxsize

    def put(self, value: Any, timeout: Any = None, **kwargs: Any) -> Any:
        """Append ``value``, waiting for room in a full queue; ``TimeoutError`` after
        ``timeout``. A value that cannot be pickled raises ``TypeError`` here."""
        _no_extra(kwargs, "Queue.put")
        blob, keys = _pack(value, f"Queue {self.name!r}")
        fields = {"name": self.name, "maxsize": self.maxsize, "blob": blob, "keys": keys}
        return self._request("queue_put", {**fields, "timeout": _seconds(timeout)}, hold=value)

    def get(self, timeout: Any = None, batch: bool | int = False, **kwargs: Any) -> Any:
        """One item, waiting for it; ``batch=True``: every item there now (a list, maybe
        empty, never waits); ``batch=n``: a list of ``n`` items, taken together."""
        _no_extra(kwargs, "Queue.get")
        if not isinstance(batch, bool) and (not isinstance(batch, int) or batch < 1):
            raise ValueError(f"batch must be True, False or a count >= 1, got {batch!r}")
        fields = {"name": self.name, "maxsize": self.maxsize, "batch": batch}
        return self._request("queue_get", {**fields, "timeout": _seconds(timeout)}, self._unpack)

    def qsize(self, **kwargs: Any) -> Any:
        """How many items wait in the queue now."""
        _no_extra(kwargs, "Queue.qsize")
        return self._request("queue_size", {"name": self.name})

    def __reduce__(self) -> Any:
        return (type(self), (self.name, None, self.maxsize))
