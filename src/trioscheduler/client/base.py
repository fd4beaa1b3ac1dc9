"""The Client's engine: its session, the loop it runs on, and the futures it holds.

``Client`` (``client/client.py``) is a facade assembled from methods by concern
(``admin``, ``datasets``, and its own futures API); all of them stand on ``ClientBase``,
whose public methods are the interface they, ``Future`` (``futures.FutureHost``) and
``transfer`` use: ``sync``, ``rpc``, ``fetch``, ``worker_connection``, ``hold_key`` /
``unhold_key``, ``wait_until_done``, ``on_done`` / ``add_done_callback`` and the table
``futures``.

One class, two modes (documented in ``docs/getting-started.md``):

* ``Client(address)`` -- sync. The client's trio session (the ``SchedulerLink``'s stream,
  receive loop and flusher) is an async context manager held open in the process-wide
  background loop (``deploy.loop.loop_runner().enter``); blocking methods cross into it
  with ``trio.from_thread``. ``close()`` (or leaving ``with``) exits the session.
* ``async with Client(address, asynchronous=True) as c`` -- the same session in the
  caller's own trio task; methods that wait return awaitables (``await c.gather(fs)``,
  ``await future``), as in dask. ``submit``/``map`` return futures directly in both.
  Under asyncio the session lives in the background loop instead and each awaitable
  is bridged to the caller's loop (``client/bridge.py``).

Everything the client sends goes through one FIFO: ``_post`` queues a callback on the
loop (``TrioToken.run_sync_soon``, thread-safe and ordered), the callback hands the
message to the link's outbox (``client/link.py``), so a release can never overtake the
submit it follows.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, Self, cast

import dask
import sniffio
import trio

from trioscheduler import wire
from trioscheduler.client import transfer as _transfer
from trioscheduler.client.bridge import Bridge, current_library
from trioscheduler.client.collections import futures_of as collection_futures
from trioscheduler.client.futures import Future, KeyState
from trioscheduler.client.key_table import KeyTable
from trioscheduler.client.keys import (
    check_key,
)
from trioscheduler.client.link import SchedulerLink
from trioscheduler.core import messages as m
from trioscheduler.deploy.loop import Entered, LoopRunner, loop_runner
from trioscheduler.errors import TrioSchedulerError
from trioscheduler.http import format_dashboard_link
from trioscheduler.wire.local_alias import local_route
from trioscheduler.wire.security import connect_args
from trioscheduler.wire.security import resolve as resolve_security

if TYPE_CHECKING:
    from trioscheduler.client.client import Client

__all__ = ["ClientBase", "ClientClosedError", "default_client"]


logger = logging.getLogger("trioscheduler.client")


_POLL = 0.25  # seconds between checks that the loop still runs while a thread waits


def _acquire(lock: Any, timeout: float) -> bool:
    """``lock.acquire(timeout=timeout)``, not blocking for a timeout that ran out."""
    return bool(lock.acquire(timeout=timeout) if timeout > 0 else lock.acquire(False))


_defaults: list[ClientBase] = []  # open clients made with set_as_default=True, newest last
_forked_away: list[list[ClientBase]] = []  # a forked child's inherited defaults, never closed there


def _forget_defaults_in_child() -> None:
    """A forked process (a nanny's worker) has no client of its own: the parent's default
    clients live in the parent. They are kept referenced, never collected, in the child:
    closing them there would speak on the parent's connections."""
    _forked_away.append(list(_defaults))
    _defaults.clear()


os.register_at_fork(after_in_child=_forget_defaults_in_child)


current_client: contextvars.ContextVar[ClientBase | None] = contextvars.ContextVar(
    "trioscheduler_current_client", default=None
)
"""The client of ``with client.as_current():`` in this thread or trio task."""


def default_client() -> Client:
    """The client of ``with client.as_current():``, else the most recent client created
    with ``set_as_default=True`` that is still open."""
    current = current_client.get()
    if current is not None and current.status == "running":
        return cast("Client", current)
    if not _defaults:
        raise ValueError("no trioscheduler Client is open; create one with Client(...)")
    return cast("Client", _defaults[-1])  # every ClientBase made is a Client


class ClientClosedError(TrioSchedulerError):
    """The client was closed (or lost its scheduler); it cannot be used any more."""


# --------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------

class ClientBase:
    """A client's session, loop and futures table; ``Client`` is the one to use."""

    get: Callable[..., Any]  # dask's scheduler interface, ``Client.get``
    asynchronous: bool = False  # set per client; a class attribute, as dask's is public
    scheduler_file: str | None = None  # the file the address came from (or was written to)

    def __init__(
        self,
        address: Any = None,
        *,
        timeout: float = 10.0,
        asynchronous: bool = False,
        set_as_default: bool = True,
        name: str | None = None,
        scheduler_file: str | None = None,
        connection_limit: int = 512,
        batch_interval: float = 0.002,
        direct_to_workers: bool | None = None,
        security: Any = None,
        reconnect_timeout: float = 60.0,
        loop: Any = None,
        _loop: Any = None,
        **cluster_kwargs: Any,
    ) -> None:
        # ``loop=`` (a tornado IOLoop in dask) is accepted and ignored, as dask ignores it
        # with an address: the session runs in trioscheduler's own loop thread.
        del loop
        if security is None and address is not None and not isinstance(address, str):
            security = getattr(address, "security", None)  # a LocalCluster's own
        self.security = resolve_security(security)
        self.id = f"Client-{uuid.uuid4()}"
        self.name = name or self.id
        self.timeout = timeout
        self.asynchronous = asynchronous
        self.status = "newly-created"
        self._set_as_default = set_as_default
        self._cluster_kwargs = cluster_kwargs
        self.futures = KeyTable()  # dask's name: key -> state of the keys this client holds
        # workers that could not map this client's shared-memory hand-off of a scatter:
        # its values go to them through the socket (``transfer.scatter``)
        self.no_shm_workers: set[str] = set()
        self._link = SchedulerLink(
            self.id,
            self.futures,
            timeout=timeout,
            batch_interval=batch_interval,
            connection_limit=connection_limit,
            connect_args=connect_args(self.security, "client"),
            reconnect_timeout=reconnect_timeout,
        )
        self._token: trio.lowlevel.TrioToken | None = None
        self._loop_ident: int | None = None  # the thread running the session's trio loop
        self._nursery: trio.Nursery | None = None
        self._runner: LoopRunner | Any = None
        self._handle: Entered[ClientBase] | None = None
        self._session_cm: Any = None
        self.cluster: Any = None
        self._own_cluster = False
        self._dask_config: Any = None
        self._dask_get: Any = None
        self._bridge: Bridge | None = None  # an asynchronous client under asyncio

        if address is None and scheduler_file is not None:
            self.scheduler_file = scheduler_file
            with open(scheduler_file) as f:
                address = json.load(f)["address"]
        if address is not None and not isinstance(address, str):
            if not hasattr(address, "scheduler_address"):
                raise TypeError(
                    f"Client(address) takes an address string or a cluster, got {address!r:.100}"
                )
            self.cluster = address
            address = address.scheduler_address
        elif cluster_kwargs and address is not None:
            raise TypeError(
                f"unexpected keyword arguments {sorted(cluster_kwargs)} with an address"
            )
        if address is None and self.security is not None:
            cluster_kwargs["security"] = self.security  # the cluster this client starts
        self.scheduler_address: str | None = address

        if not asynchronous:
            # ``_loop``: another loop to run the session in (a worker's, for get_client)
            self._runner = _loop if _loop is not None else loop_runner()
            if address is None:
                from trioscheduler.deploy.cluster import LocalCluster

                self.cluster = LocalCluster(**cluster_kwargs)
                self._own_cluster = True
                self.scheduler_address = self.cluster.scheduler_address
            try:
                self._handle = self._runner.enter(self._session(), name=f"Client {self.id}")
            except BaseException:
                if self._own_cluster:
                    self.cluster.close()
                raise

    # -- session -------------------------------------------------------------------

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[Self]:
        error: BaseException | None = None
        try:
            async with AsyncExitStack() as stack:
                await self._open(stack)
                try:
                    yield self
                except BaseException as exc:
                    # Re-raised below, unwrapped: the user's own error, not an
                    # ExceptionGroup (and not lost if closing is cancelled from outside).
                    error = exc
                finally:
                    with trio.CancelScope(shield=True):
                        await self._shutdown()
        finally:
            if error is not None:
                raise error

    async def _open(self, stack: AsyncExitStack) -> None:
        """Connect (or start a cluster first), handshake, start the background tasks."""
        if self.scheduler_address is None:
            from trioscheduler.deploy.cluster import open_cluster

            self.cluster = await stack.enter_async_context(open_cluster(**self._cluster_kwargs))
            self._own_cluster = True
            self.scheduler_address = self.cluster.scheduler_address
        address = self.scheduler_address
        assert address is not None
        self._token = trio.lowlevel.current_trio_token()
        self._loop_ident = threading.get_ident()
        # A scheduler in this very trio run is reached in memory (its inproc alias).
        await self._link.open(stack, address, local_route(address))
        nursery = await stack.enter_async_context(trio.open_nursery())
        await nursery.start(self._background)
        self._session_started()
        self.status = "running"
        self._make_default()

    def _session_started(self) -> None:
        """Hook for mixins: the link and the background nursery are up (loop thread)."""

    async def _background(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The client's own tasks, in a nursery that ``_shutdown`` cancels.

        Cancelling this nursery (not the session's) never cancels the user's code that
        runs inside ``async with Client(...)``.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self._link.serve, self._on_lost)
            task_status.started()

    async def _shutdown(self) -> None:
        """Release every key (``RemoveClient``), wait for the scheduler's ack, stop tasks."""
        if self._link.closing:
            return
        self.status = "closing"
        await self._link.goodbye()
        for st in self.futures.drop_all():
            if not st.done:
                st.cancel("the client was closed")
        self.status = "closed"
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        # The previous default client (and dask scheduler) is the current one again.
        if self in _defaults:
            _defaults.remove(self)
        dask_scheduler = dask.config.get("scheduler", None)
        if self._dask_config is not None and dask_scheduler is self._dask_get:
            self._dask_config.__exit__(None, None, None)
            owner = getattr(dask.config.get("scheduler", None), "__self__", None)
            if isinstance(owner, ClientBase) and owner._link.closing:
                # closed out of order: fall back to the newest client still open
                newest = next((c for c in reversed(_defaults) if c._dask_get), None)
                dask.config.set({"scheduler": newest._dask_get if newest else None})
        self._dask_config = None

    def _make_default(self) -> None:
        """The current client, and (sync clients) dask's scheduler: ``x.compute()`` runs here."""
        if self._set_as_default:
            _defaults.append(self)
            if not self.asynchronous:
                self._dask_get = self.get
                self._dask_config = dask.config.set(
                    {"scheduler": self._dask_get, "dataframe.shuffle.method": "tasks"}
                )

    async def __aenter__(self) -> Self:
        if not self.asynchronous:
            raise TypeError(
                "use 'with Client(...)' for a sync client, or Client(..., asynchronous=True)"
            )
        if current_library() == "asyncio":
            await self._enter_bridged()
            return self
        _require_trio("async with Client(..., asynchronous=True)")
        self._session_cm = self._session()
        await self._session_cm.__aenter__()
        return self

    async def _enter_bridged(self) -> None:
        """Under asyncio: the session lives in the background trio loop (``bridge``)."""
        import anyio

        self._runner = loop_runner()
        name = f"Client {self.id}"
        self._handle = await anyio.to_thread.run_sync(
            lambda: self._runner.enter(self._session(), name=name)
        )
        assert self._token is not None
        self._bridge = Bridge(self._token)

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        if self._bridge is not None:
            import anyio

            handle, self._handle = self._handle, None
            if handle is not None:
                await anyio.to_thread.run_sync(handle.close)
            self.status = "closed"
            return None
        cm, self._session_cm = self._session_cm, None
        if cm is None:
            return None
        result: bool | None = await cm.__aexit__(*exc_info)
        return result

    def __enter__(self) -> Self:
        if self.asynchronous:
            raise TypeError(
                "use 'async with Client(..., asynchronous=True)' for an asynchronous client"
            )
        if not self._set_as_default and self.status == "running":
            self._set_as_default = True  # the current client inside ``with``, as in dask
            self._make_default()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __await__(self) -> Any:
        raise TypeError(
            "trioscheduler clients are structured: use 'async with Client(address, asynchronous=True) as c'"
        )

    def close(self, timeout: float | None = None) -> Any:
        """Release every key of this client and stop its background work.

        Sync: blocks, then closes the ``LocalCluster`` the client started. Asynchronous:
        returns an awaitable (the session itself ends when ``async with`` does).
        """
        if self.asynchronous:
            return self.sync(self._shutdown)
        if self._handle is not None:
            handle, self._handle = self._handle, None
            try:
                handle.close()
            finally:
                if self._own_cluster and self.cluster is not None:
                    self.cluster.close()
                self.status = "closed"
        return None

    def __repr__(self) -> str:
        return f"<Client: scheduler={self.scheduler_address!r} status={self.status}>"

    @property
    def dashboard_link(self) -> str | None:
        """The scheduler's dashboard, ``http://host:port/status``; None if it has none.

        As dask's: the port the scheduler announced, on the host this client reached
        the scheduler by (when the dashboard listens on every interface)."""
        services = self._link.services
        port = services.get("dashboard")
        if not isinstance(port, int):
            return None
        host = ""
        if self.scheduler_address and self.scheduler_address.startswith("tcp://"):
            host = wire.parse_address(self.scheduler_address)[1] or ""
        return format_dashboard_link(str(services.get("dashboard_host", "")), port, host)

    # -- plumbing ----------------------------------------------------------------------

    def sync(self, async_fn: Callable[..., Any], *args: Any) -> Any:
        """Awaitable in asynchronous mode; run to completion in the loop otherwise."""
        if self.asynchronous:
            if self._bridge is not None:
                return self._bridge.call(async_fn, *args)
            return async_fn(*args)
        if self._runner is None or self.status in ("closed", "closing"):
            raise ClientClosedError(f"{self!r} is closed")
        return self._runner.run(async_fn, *args)

    def wait_until_done(self, st: KeyState, timeout: float | None, key: Any) -> bool:
        """Sync client: block the calling thread until ``st`` is done.

        The loop releases a lock this thread holds from the key's done-hooks, so the
        caller wakes as soon as the message is handled, with no trio task started for it
        and no result handed back through ``trio.from_thread``. (A bare lock, not a
        ``threading.Event``: the event's condition, made, waited on and set, cost
        ~10 us of the round trip's critical path, between the user's post and its wait
        and between the future's settling and its wake-up; the lock ~1.5 us.) ``False`` where this does not
        apply (a worker's own loop, a closed client): the caller then crosses into the
        loop as usual. ``TimeoutError`` after ``timeout`` seconds.

        The hook is appended from this thread, not posted to the loop (a post is one
        more loop wake-up per ``result()``): ``KeyState.add_waiter`` says why no
        wake-up can be lost. While this thread sleeps its lock is in the runner's
        ``sleepers``, and the loop may busy-poll (``wire.busy_poll``); the hook takes it
        out before the release, so the loop stops polling before this thread wants
        the GIL back.
        """
        runner = self._runner
        if type(runner) is not LoopRunner or self.status != "running":
            return False
        if st.done:
            return True
        runner.check_blocking("result()")
        woken = threading.Lock()
        woken.acquire()
        sleepers = runner.sleepers  # the loop may busy-poll while this thread sleeps

        def wake() -> None:
            sleepers.discard(woken)
            woken.release()

        sleepers.add(woken)
        try:
            if st.add_waiter(wake):
                return True
            deadline = math.inf if timeout is None else time.monotonic() + timeout
            while not _acquire(woken, min(_POLL, deadline - time.monotonic())):
                if st.done:  # a wake-up lost all the same: the poll still sees it
                    return True
                if not runner.alive or self.status != "running":
                    return False  # the loop or the session ended: the usual path reports it
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"future {key!r} was not done after {timeout} s")
            return True
        finally:
            sleepers.discard(woken)

    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the loop thread, in call order, from any thread.

        Called in the loop thread itself (an asynchronous client), ``fn`` runs at once:
        deferred, a ``submit`` followed by a request (``publish_dataset``...) would let
        the request name a stream position before the submit's message, and overtake it.
        """
        token = self._token
        if token is None or self.status == "closed":
            raise ClientClosedError(f"{self!r} is not running")
        if threading.get_ident() == self._loop_ident:
            fn(*args)
        else:
            token.run_sync_soon(fn, *args)

    def _on_lost(self) -> None:
        """The scheduler went away unasked: every pending future is cancelled."""
        self.status = "closed"
        for st in self.futures.snapshot().values():
            if not st.done:
                st.cancel("lost the connection to the scheduler")

    # -- reference counting ------------------------------------------------------------

    def hold_key(self, key: Any) -> KeyState:
        """A new ``Future(key, client)`` by hand: count it; want the key if it is new."""
        check_key(key)
        with self.futures.lock:
            st, new = self.futures.hold(key)
            if new:
                self._post(self._emit_desire, [key])
        return st

    def _emit_desire(self, keys: list[Any], client: str | None = None) -> None:
        self._link.emit(
            m.ClientDesiresKeys(
                self._link.stimulus("desire"), trio.current_time(), client or self.id, keys
            )
        )

    def unhold_key(self, key: Any) -> None:
        """A ``Future`` of ``key`` is gone; the last one releases the key."""
        with self.futures.lock:
            if not self.futures.unhold(key):
                return
            if self.status in ("running", "newly-created") and self._token is not None:
                # Inside the lock: a submit of the same key queues after this release.
                try:
                    self._token.run_sync_soon(self._release_key, key)
                except trio.RunFinishedError:
                    pass

    def _release_key(self, key: Any) -> None:
        if self.futures.release(key) is not None:
            self._link.emit(
                m.ClientReleasesKeys(
                    self._link.stimulus("release"), trio.current_time(), self.id, [key]
                )
            )

    def _held_keys(self, *objs: Any) -> set[Any]:
        """Keys on the cluster a new graph may depend on without recomputing them."""
        held = set(self.futures.snapshot())
        held.update(f.key for f in collection_futures(objs, is_future=_is_our_future))
        return held

    def on_done(self, future: Future, hook: Callable[[], None]) -> None:
        """Run ``hook()`` in the loop thread once ``future`` is done (now, if it is)."""
        st = future._state

        def add() -> None:
            if st.done:
                hook()
            else:
                st.hooks.append(hook)

        self._post(add)

    def add_done_callback(self, future: Future, fn: Callable[[Future], Any]) -> None:
        async def call() -> None:
            try:
                await trio.to_thread.run_sync(fn, future)
            except Exception:
                logger.exception("done-callback %r of %r failed", fn, future)

        def hook() -> None:
            if self._nursery is not None and not self._link.closing:
                self._nursery.start_soon(call)

        self.on_done(future, hook)

    def start_soon(
        self, async_fn: Callable[[], Awaitable[Any]], if_closed: Callable[[], None]
    ) -> None:
        """Run ``async_fn()`` in the session's background nursery, from any thread, in
        call order (an actor call in flight); ``if_closed()`` instead, in the loop
        thread, once the session is closing."""

        def start() -> None:
            if self._nursery is not None and not self._link.closing:
                self._nursery.start_soon(async_fn)
            else:
                if_closed()

        self._post(start)

    async def fetch(self, keys: list[Any], errors: str = "raise") -> dict[Any, Any]:
        """Values of finished ``keys`` (used by ``Future.result``)."""
        return await _transfer.fetch(self, keys, errors)

    def worker_connection(self, address: str) -> AbstractAsyncContextManager[wire.Stream]:
        """A pooled connection to ``address`` (a worker's data server)."""
        return self._link.worker_connection(address)

    async def rpc(self, msg: dict[str, Any]) -> Any:
        """One request to the scheduler, answered after everything this client sent
        before it on its stream."""
        return await self._link.rpc(msg)


def _is_our_future(x: Any) -> bool:
    return type(x) is Future


def _require_trio(what: str) -> None:
    """The asynchronous client runs in the caller's trio task tree, or bridged from asyncio
    (``bridge``); under any other event loop trio's primitives would fail deep inside
    with "Task got bad yield": say so first."""
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return
    if library in ("trio", "asyncio"):
        return
    raise RuntimeError(
        f"{what} runs under trio or asyncio, not {library}; the sync Client works anywhere"
    )
