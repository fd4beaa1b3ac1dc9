"""The Client: dask.distributed's futures API over one scheduler stream.

One class, two modes (documented in ``docs/getting-started.md``):

* ``Client(address)`` -- sync. The client's trio session (stream, receive loop, flusher)
  is an async context manager held open in the process-wide background loop
  (``_loop.loop_runner().enter``); blocking methods cross into it with
  ``trio.from_thread``. ``close()`` (or leaving ``with``) exits the session.
* ``async with Client(address, asynchronous=True) as c`` -- the same session in the
  caller's own trio task; methods that wait return awaitables (``await c.gather(fs)``,
  ``await future``), as in dask. ``submit``/``map`` return futures directly in both.
  Under asyncio (not trio) it refuses with an error that points to the sync client
  through ``asyncio.to_thread``, which works there.

Everything the client sends goes through one FIFO: ``_post`` queues a callback on the
loop (``TrioToken.run_sync_soon``, thread-safe and ordered), the callback appends the
message to an outbox, and a flusher task merges adjacent ``UpdateGraph`` and
``ClientReleasesKeys`` messages before writing them. So a burst of ``submit`` calls
becomes one graph, and a release can never overtake the submit it follows.

Requests (``who_has``, ``scatter``'s ``update_data``...) go over pooled connections and
name how many stream messages came before them; the scheduler answers only after
handling those, so a request never overtakes what the client sent earlier.

Leaving the session sends ``RemoveClient``; the scheduler releases every key of this
client and closes the stream, which the receive loop sees before the nursery ends.

Dask collections: ``compute``/``persist``/``get`` turn graphs into tasks with
``trioscheduler.client.collections``; a sync client is dask's scheduler while it is open.
Published datasets (``datasets``), uploaded files (``_upload``), ``run``,
``run_on_scheduler`` and ``restart`` are requests to the scheduler or the workers; the
client only packs them and unpacks the answers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import cloudpickle
import dask
import sniffio
import trio

from trioscheduler import wire
from trioscheduler.client import datasets
from trioscheduler.client import transfer as _transfer
from trioscheduler.client.collections import (
    collections_to_graph,
    flatten_keys,
    graph_to_tasks,
    repack,
)
from trioscheduler.client.collections import futures_of as collection_futures
from trioscheduler.client.futures import Future, KeyState, futures_of
from trioscheduler.client.keys import (
    check_key,
    check_options,
    check_workers,
    map_keys,
    shippable,
    submit_key,
)
from trioscheduler.core import messages as m
from trioscheduler.core.errors import RESTART_REASON
from trioscheduler.deploy.loop import Entered, LoopRunner, loop_runner
from trioscheduler.errors import TrioSchedulerError
from trioscheduler.server import uploads as _upload
from trioscheduler.wire import runspec
from trioscheduler.wire.local_alias import local_route
from trioscheduler.wire.remote_error import unpack_exception

__all__ = ["Client", "Executor", "default_client", "fire_and_forget"]

logger = logging.getLogger("trioscheduler.client.client")


_POLL = 0.25  # seconds between checks that the loop still runs while a thread waits
_defaults: list[Client] = []  # open clients made with set_as_default=True, newest last
_forked_away: list[list[Client]] = []  # a forked child's inherited defaults, never closed there


def _forget_defaults_in_child() -> None:
    """A forked process (a nanny's worker) has no client of its own: the parent's default
    clients live in the parent. They are kept referenced, never collected, in the child:
    closing them there would speak on the parent's connections."""
    _forked_away.append(list(_defaults))
    _defaults.clear()


os.register_at_fork(after_in_child=_forget_defaults_in_child)
_NO_DEFAULT: Any = object()  # get_dataset(name) without default= raises KeyError


def default_client() -> Client:
    """The most recent client created with ``set_as_default=True`` that is still open."""
    if not _defaults:
        raise ValueError("no trioscheduler Client is open; create one with Client(...)")
    return _defaults[-1]


class ClientClosedError(TrioSchedulerError):
    """The client was closed (or lost its scheduler); it cannot be used any more."""


# --------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------


class Client:
    """Connect to a scheduler (or start a ``LocalCluster``) and submit work to it.

    ``address``: ``"tcp://host:port"``, ``"inproc://name"``, a ``LocalCluster`` (or
    anything with ``.scheduler_address``), or ``None`` to start a local cluster with
    ``**cluster_kwargs`` (``n_workers``, ``threads_per_worker``, ``processes``,
    ``memory_limit``...), closed again with the client.
    """

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
        _loop: Any = None,
        **cluster_kwargs: Any,
    ) -> None:
        # dask's keywords: data always goes straight to the workers; TLS comes later.
        if security is not None:
            raise ValueError(
                "Client(security=...): trioscheduler has no TLS; connect over tcp:// "
                "on a trusted network, or leave security unset"
            )
        self.id = f"Client-{uuid.uuid4()}"
        self.name = name or self.id
        self.timeout = timeout
        self.asynchronous = asynchronous
        self.status = "newly-created"
        self._set_as_default = set_as_default
        self._connection_limit = connection_limit
        self._batch_interval = batch_interval
        self._cluster_kwargs = cluster_kwargs
        # Reentrant: a Future's __del__ (garbage collection can run at any allocation,
        # also inside a locked section of this thread) takes it to uncount its key.
        self._lock = threading.RLock()
        self._futures: dict[Any, KeyState] = {}
        self._refcount: dict[Any, int] = {}
        self._outbox: list[Any] = []
        self._merge_order = 0  # the next free ``order`` of the last graph in the outbox
        self._outbox_ready: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._loop_ident: int | None = None  # the thread running the session's trio loop
        self._nursery: trio.Nursery | None = None
        self._stream: wire.Stream | None = None
        self._batched: wire.BatchedSend | None = None
        self._pool: wire.ConnectionPool | None = None
        self._receive_done: trio.Event | None = None
        self._closing = False
        self._stimulus = 0
        self._sent = 0  # messages written to the scheduler stream after AddClient
        self._scattered: set[Any] = set()  # keys this client scattered and still holds
        self._released_scattered: dict[Any, None] = {}  # recently released ones (bounded)
        self._aliases: dict[Any, str] = {}  # released scattered key -> name used instead
        self._runner: LoopRunner | Any = None
        self._handle: Entered[Client] | None = None
        self._session_cm: Any = None
        self.cluster: Any = None
        self.datasets = datasets.Datasets(self)
        self._own_cluster = False
        self._dask_config: Any = None
        self._dask_get: Any = None

        if address is None and scheduler_file is not None:
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
        self.scheduler_address: str | None = address
        self._route: str | None = None  # what we connect to: the address or its inproc alias

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
    async def _session(self) -> AsyncIterator[Client]:
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
        self._route = local_route(address)
        try:
            stream = await wire.connect(
                self._route, timeout=self.timeout, role="client", info={"id": self.id}
            )
        except wire.ConnectError as exc:
            raise wire.ConnectError(
                f"Client could not connect to the scheduler at {address} within {self.timeout} s: {exc}"
            ) from exc
        self._stream = stream
        stack.push_async_callback(stream.aclose)
        ack: Any = None
        with trio.move_on_after(self.timeout):
            try:
                await stream.send(
                    m.AddClient(self._next_stimulus("add-client"), trio.current_time(), self.id)
                )
                ack = await stream.receive()
            except (trio.BrokenResourceError, trio.EndOfChannel) as exc:
                ack = exc
        if not (isinstance(ack, dict) and ack.get("op") == "stream-start"):
            raise wire.ConnectError(
                f"the scheduler at {address} did not acknowledge the client: {ack!r:.100}"
            )
        self._pool = await stack.enter_async_context(
            wire.ConnectionPool(
                self._connection_limit,
                timeout=self.timeout,
                role="client",
                info={"id": self.id},
            )
        )
        self._batched = await stack.enter_async_context(
            _tolerant_batched(stream, self._batch_interval)
        )
        self._outbox_ready = trio.Event()
        self._receive_done = trio.Event()
        nursery = await stack.enter_async_context(trio.open_nursery())
        await nursery.start(self._background)
        self.status = "running"
        self._make_default()

    async def _background(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The client's own tasks, in a nursery that ``_shutdown`` cancels.

        Cancelling this nursery (not the session's) never cancels the user's code that
        runs inside ``async with Client(...)``.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._receive_loop)
            nursery.start_soon(self._flusher)
            task_status.started()

    async def _shutdown(self) -> None:
        """Release every key (``RemoveClient``), wait for the scheduler's ack, stop tasks."""
        if self._closing:
            return
        self._closing = True
        self.status = "closing"
        with trio.move_on_after(self.timeout):
            try:
                self._flush_outbox()
                assert self._batched is not None
                self._batched.send_nowait(
                    m.RemoveClient(
                        self._next_stimulus("close-client"), trio.current_time(), self.id
                    )
                )
                await self._batched.flush()
                assert self._receive_done is not None
                await self._receive_done.wait()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        with self._lock:
            states = list(self._futures.values())
            self._futures.clear()
        for st in states:
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
            if isinstance(owner, Client) and owner._closing:
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

    async def __aenter__(self) -> Client:
        if not self.asynchronous:
            raise TypeError(
                "use 'with Client(...)' for a sync client, or Client(..., asynchronous=True)"
            )
        _require_trio("async with Client(..., asynchronous=True)")
        self._session_cm = self._session()
        await self._session_cm.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        cm, self._session_cm = self._session_cm, None
        if cm is None:
            return None
        result: bool | None = await cm.__aexit__(*exc_info)
        return result

    def __enter__(self) -> Client:
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
            return self._shutdown()
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

    # -- plumbing ----------------------------------------------------------------------

    def _sync(self, async_fn: Callable[..., Any], *args: Any) -> Any:
        """Awaitable in asynchronous mode; run to completion in the loop otherwise."""
        if self.asynchronous:
            return async_fn(*args)
        if self._runner is None or self.status in ("closed", "closing"):
            raise ClientClosedError(f"{self!r} is closed")
        return self._runner.run(async_fn, *args)

    def _block_until_done(self, st: KeyState, timeout: float | None, key: Any) -> bool:
        """Sync client: block the calling thread until ``st`` is done.

        The loop sets a ``threading.Event`` from the key's done-hooks, so the caller
        wakes as soon as the message is handled, with no trio task started for it and no
        result handed back through ``trio.from_thread``. ``False`` where this does not
        apply (a worker's own loop, a closed client): the caller then crosses into the
        loop as usual. ``TimeoutError`` after ``timeout`` seconds.
        """
        runner = self._runner
        if type(runner) is not LoopRunner or self.status != "running":
            return False
        if st.done:
            return True
        runner.check_blocking("result()")
        event = threading.Event()

        def arm() -> None:  # loop thread
            if st.done:
                event.set()
            else:
                st.hooks.append(event.set)

        self._post(arm)
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        while not event.wait(min(_POLL, deadline - time.monotonic())):
            if not runner.alive or self.status != "running":
                return False  # the loop or the session ended: the usual path reports it
            if time.monotonic() >= deadline:
                raise TimeoutError(f"future {key!r} was not done after {timeout} s")
        return True

    def _next_stimulus(self, kind: str) -> str:
        self._stimulus += 1
        return f"{kind}-{self._stimulus}"

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

    def _emit(self, msg: Any) -> None:
        """Loop thread: queue ``msg`` for the scheduler, merging with the previous one.

        Merged graphs keep their submission order: each later part's ``order`` starts
        after the earlier part's, as separate graphs would run in generation order.
        """
        if self._closing:
            return
        ob = self._outbox
        t = type(msg)
        if t is m.UpdateGraph:
            if ob and type(ob[-1]) is t:
                last = ob[-1]
                base = self._merge_order
                for spec in msg.tasks:
                    spec.order += base
                last.tasks.extend(msg.tasks)
                last.keys.extend(msg.keys)
            else:
                ob.append(msg)
                base = 0
            if msg.tasks:
                self._merge_order = base + 1 + max(spec.order - base for spec in msg.tasks)
        elif t is m.ClientReleasesKeys and ob and type(ob[-1]) is t:
            ob[-1].keys.extend(msg.keys)
        else:
            ob.append(msg)
        if self._outbox_ready is not None:
            self._outbox_ready.set()

    def _flush_outbox(self) -> None:
        msgs, self._outbox = self._outbox, []
        assert self._batched is not None
        for msg in msgs:
            self._batched.send_nowait(msg)
        self._sent += len(msgs)

    async def _flusher(self) -> None:
        last = -float("inf")
        while True:
            assert self._outbox_ready is not None
            await self._outbox_ready.wait()
            self._outbox_ready = trio.Event()
            now = trio.current_time()
            idle, last = now - last >= self._batch_interval, now
            try:
                self._flush_outbox()
                if idle:  # after a quiet spell, write now: batching would only add latency
                    assert self._batched is not None
                    await self._batched.flush()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def _receive_loop(self) -> None:
        assert self._stream is not None and self._receive_done is not None
        handlers = self._handlers
        try:
            async for msg in self._stream:
                handler = handlers.get(type(msg))
                if handler is None:
                    logger.warning(
                        "client %s: unexpected message from the scheduler: %r", self.id, msg
                    )
                    continue
                handler(self, msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if not self._closing:
                logger.warning("client %s lost its scheduler connection: %r", self.id, exc)
        finally:
            self._receive_done.set()
            if not self._closing:
                logger.warning(
                    "client %s: the scheduler at %s closed the connection",
                    self.id,
                    self.scheduler_address,
                )
                self.status = "closed"
                with self._lock:
                    states = list(self._futures.values())
                for st in states:
                    if not st.done:
                        st.cancel("lost the connection to the scheduler")

    def _on_key_in_memory(self, msg: m.KeyInMemory) -> None:
        st = self._futures.get(msg.key)
        if st is not None:
            st.finish(msg.type_name)

    def _on_key_erred(self, msg: m.KeyErred) -> None:
        st = self._futures.get(msg.key)
        if st is not None:
            st.erred(msg.exception, msg.traceback, msg.exception_text)

    def _on_key_cancelled(self, msg: m.KeyCancelled) -> None:
        with self._lock:
            st = self._futures.pop(msg.key, None)
        if st is not None:
            st.cancel(msg.reason)

    def _on_key_lost(self, msg: m.KeyLost) -> None:
        st = self._futures.get(msg.key)
        if st is not None:
            st.lost()

    def _on_value(self, msg: dict[str, Any]) -> None:
        """A small result, just ahead of its ``KeyInMemory``: kept, so no fetch is needed."""
        if msg.get("op") != "value":
            logger.warning("client %s: unexpected message from the scheduler: %r", self.id, msg)
            return
        st = self._futures.get(msg["key"])
        if st is not None:
            st.held = (msg["value"],)

    _handlers: dict[type[Any], Callable[[Client, Any], None]] = {
        m.KeyInMemory: _on_key_in_memory,
        m.KeyErred: _on_key_erred,
        m.KeyCancelled: _on_key_cancelled,
        m.KeyLost: _on_key_lost,
        dict: _on_value,
    }

    # -- reference counting ------------------------------------------------------------

    def _attach(self, key: Any) -> KeyState:
        """A new ``Future(key, client)`` by hand: count it; want the key if it is new."""
        check_key(key)
        with self._lock:
            st = self._futures.get(key)
            if st is None:
                st = self._futures[key] = KeyState(key)
                self._post(self._emit_desire, [key])
            self._refcount[key] = self._refcount.get(key, 0) + 1
        return st

    def _emit_desire(self, keys: list[Any], client: str | None = None) -> None:
        self._emit(
            m.ClientDesiresKeys(
                self._next_stimulus("desire"), trio.current_time(), client or self.id, keys
            )
        )

    def _detach(self, key: Any) -> None:
        with self._lock:
            n = self._refcount.get(key, 0) - 1
            if n > 0:
                self._refcount[key] = n
                return
            self._refcount.pop(key, None)
            if self.status in ("running", "newly-created") and self._token is not None:
                # Inside the lock: a submit of the same key queues after this release.
                try:
                    self._token.run_sync_soon(self._release_key, key)
                except trio.RunFinishedError:
                    pass

    def _release_key(self, key: Any) -> None:
        with self._lock:
            if key in self._refcount:  # a new future for the key appeared meanwhile
                return
            st = self._futures.pop(key, None)
            if key in self._scattered:
                self._scattered.discard(key)
                self._released_scattered[key] = None
                if len(self._released_scattered) > 10_000:
                    oldest = next(iter(self._released_scattered))
                    del self._released_scattered[oldest]
                    self._aliases.pop(oldest, None)
        if st is not None:
            self._emit(
                m.ClientReleasesKeys(
                    self._next_stimulus("release"), trio.current_time(), self.id, [key]
                )
            )

    def _new_futures(self, specs: list[m.TaskSpec]) -> list[Future]:
        """Futures for ``specs``; tasks whose key this client already has are not resent."""
        futures: list[Future] = []
        fresh: list[m.TaskSpec] = []
        with self._lock:
            if self.status != "running":
                raise ClientClosedError(f"{self!r} is not running")
            table, refs = self._futures, self._refcount
            for spec in specs:
                key = spec.key
                st = table.get(key)
                if st is None:
                    st = table[key] = KeyState(key)
                    fresh.append(spec)
                refs[key] = refs.get(key, 0) + 1
                futures.append(Future(key, self, st))
            if fresh:
                self._post(self._emit_graph, fresh)
        return futures

    def _emit_graph(self, specs: list[m.TaskSpec], keys: list[Any] | None = None) -> None:
        self._emit(
            m.UpdateGraph(
                self._next_stimulus("update-graph"),
                trio.current_time(),
                self.id,
                specs,
                [s.key for s in specs] if keys is None else keys,
            )
        )

    def _graph_futures(self, tasks: list[m.TaskSpec], wanted: list[Any]) -> dict[Any, Future]:
        """Send a graph (``tasks``, dependencies first); futures for the ``wanted`` keys."""
        futures: dict[Any, Future] = {}
        new: list[Any] = []
        with self._lock:
            if self.status != "running":
                raise ClientClosedError(f"{self!r} is not running")
            table, refs = self._futures, self._refcount
            for key in dict.fromkeys(wanted):
                st = table.get(key)
                if st is None:
                    st = table[key] = KeyState(key)
                    new.append(key)
                refs[key] = refs.get(key, 0) + 1
                futures[key] = Future(key, self, st)
            if tasks or new:
                self._post(self._emit_graph, tasks, new)
        return futures

    def _held_keys(self, *objs: Any) -> set[Any]:
        """Keys on the cluster a new graph may depend on without recomputing them."""
        with self._lock:
            held = set(self._futures)
        held.update(f.key for f in collection_futures(objs, is_future=_is_our_future))
        return held

    def _on_done(self, future: Future, hook: Callable[[], None]) -> None:
        """Run ``hook()`` in the loop thread once ``future`` is done (now, if it is)."""
        st = future._state

        def add() -> None:
            if st.done:
                hook()
            else:
                st.hooks.append(hook)

        self._post(add)

    def _add_done_callback(self, future: Future, fn: Callable[[Future], Any]) -> None:
        async def call() -> None:
            try:
                await trio.to_thread.run_sync(fn, future)
            except Exception:
                logger.exception("done-callback %r of %r failed", fn, future)

        def hook() -> None:
            if self._nursery is not None and not self._closing:
                self._nursery.start_soon(call)

        self._on_done(future, hook)

    # -- submit and map --------------------------------------------------------------

    def submit(
        self,
        func: Callable[..., Any],
        *args: Any,
        key: Any = None,
        workers: Any = None,
        resources: Any = None,
        retries: int | None = None,
        priority: int = 0,
        allow_other_workers: bool = False,
        pure: bool = True,
        **kwargs: Any,
    ) -> Future:
        """Run ``func(*args, **kwargs)`` on the cluster; a ``Future`` for the result.

        Futures among the arguments become dependencies (their values are passed in).
        Pure calls get deterministic keys, so the same call is computed once.
        """
        if not callable(func):
            raise TypeError("the first argument of submit must be a callable function")
        w, r, n_retries, prio, aow = check_options(
            workers, resources, retries, priority, allow_other_workers
        )
        if key is None:
            key = submit_key(func, args, kwargs, pure)
        else:
            check_key(key)
        with self._lock:
            st = self._futures.get(key)
            if st is not None:
                self._refcount[key] = self._refcount.get(key, 0) + 1
                return Future(key, self, st)
        run_spec, deps = runspec.pack(func, args, kwargs)
        spec = m.TaskSpec(key, deps, run_spec, prio, 0, w, aow, r, n_retries)
        return self._new_futures([spec])[0]

    def map(
        self,
        func: Callable[..., Any],
        *iterables: Iterable[Any],
        key: Any = None,
        workers: Any = None,
        resources: Any = None,
        retries: int | None = None,
        priority: int = 0,
        allow_other_workers: bool = False,
        pure: bool = True,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> list[Future]:
        """``submit`` over the zipped ``iterables`` (equal lengths); one graph, one message.

        ``key`` is a prefix for the generated keys or a list of keys.
        """
        if not callable(func):
            raise TypeError("the first argument of map must be a callable function")
        if not iterables:
            return []
        if any(isinstance(it, (dict, str)) for it in iterables):
            raise TypeError("map() iterates over sequences of arguments, not a dict or str")
        seqs = [it if isinstance(it, (list, tuple)) else list(it) for it in iterables]
        lengths = sorted({len(s) for s in seqs})
        if len(lengths) > 1:
            raise ValueError(f"map() needs iterables of equal length, got lengths {lengths}")
        w, r, n_retries, prio, aow = check_options(
            workers, resources, retries, priority, allow_other_workers
        )
        calls = list(zip(*seqs, strict=True))
        keys = map_keys(func, calls, kwargs, key, pure)
        shipped = shippable(func)
        pack = runspec.pack
        TaskSpec = m.TaskSpec
        specs: list[m.TaskSpec] = []
        packed: dict[Any, m.TaskSpec] = {}
        for k, args in zip(keys, calls, strict=True):
            spec = packed.get(k)  # the same pure call twice in one map: pack it once
            if spec is None:
                run_spec, deps = pack(shipped, args, kwargs)
                spec = packed[k] = TaskSpec(k, deps, run_spec, prio, 0, w, aow, r, n_retries)
            specs.append(spec)
        return self._new_futures(specs)

    # -- dask collections ----------------------------------------------------------------

    def compute(
        self,
        collections: Any,
        sync: bool = False,
        optimize_graph: bool = True,
        workers: Any = None,
        allow_other_workers: bool = False,
        resources: Any = None,
        retries: int | None = None,
        priority: int = 0,
        traverse: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Futures for dask collections (one, or a list); their values with ``sync=True``."""
        singleton = not isinstance(collections, (list, tuple, set, frozenset))
        g = collections_to_graph(collections, optimize_graph=optimize_graph, traverse=traverse)
        # Futures are looked for in the materialized graph, not the collections: walking
        # those makes dask build (and cache on them) one more merged dict of the graph.
        futures = self._submit_graph(
            g.graph, g.flat_keys, g.annotations, (g.graph,),
            workers, allow_other_workers, resources, retries, priority,
        )  # fmt: skip
        results = g.per_collection(futures)
        if sync:
            return self._sync(self._gather_one, results, singleton)
        return results[0] if singleton else results

    async def _gather_one(self, results: list[Any], singleton: bool) -> Any:
        values = await self._gather(results, "raise")
        return values[0] if singleton else values

    def persist(
        self,
        collections: Any,
        optimize_graph: bool = True,
        workers: Any = None,
        allow_other_workers: bool = False,
        resources: Any = None,
        retries: int | None = None,
        priority: int = 0,
        **kwargs: Any,
    ) -> Any:
        """The collections rebuilt on futures: computed on the cluster, kept there."""
        singleton = not isinstance(collections, (list, tuple, set, frozenset))
        g = collections_to_graph(collections, optimize_graph=optimize_graph, persist=True)
        futures = self._submit_graph(
            g.graph, g.flat_keys, g.annotations, (g.graph,),
            workers, allow_other_workers, resources, retries, priority,
        )  # fmt: skip
        out = g.rebuild(futures)
        return out[0] if singleton else out

    def get(
        self,
        dsk: Any,
        keys: Any,
        workers: Any = None,
        allow_other_workers: bool | None = None,
        resources: Any = None,
        sync: bool = True,
        retries: int | None = None,
        priority: int = 0,
        **kwargs: Any,
    ) -> Any:
        """dask's scheduler interface: the values of ``keys`` (nested lists) of graph ``dsk``."""
        flat = flatten_keys(keys)
        futures = self._submit_graph(
            dsk, flat, None, (), workers, allow_other_workers, resources, retries, priority
        )
        if not sync:
            return repack(keys, futures)
        return self._sync(self._get_values, keys, flat, futures)

    async def _get_values(self, keys: Any, flat: list[Any], futures: dict[Any, Future]) -> Any:
        try:
            values = await self._gather([futures[k] for k in flat], "raise")
            return repack(keys, dict(zip(flat, values, strict=True)))
        finally:
            for f in futures.values():
                f.release()

    def _submit_graph(
        self,
        dsk: Any,
        wanted: list[Any],
        annotations: Any,
        containers: tuple[Any, ...],
        workers: Any,
        allow_other_workers: Any,
        resources: Any,
        retries: Any,
        priority: Any,
    ) -> dict[Any, Future]:
        w, r, n_retries, prio, aow = check_options(
            workers, resources, retries, priority, allow_other_workers
        )
        tasks = graph_to_tasks(
            dsk,
            keys_wanted=wanted,
            known_keys=self._held_keys(*containers),
            annotations=annotations,
            workers=w,
            allow_other_workers=aow if w else None,
            resources=r,
            retries=n_retries or None,
            priority=prio,
        )
        return self._graph_futures(tasks, wanted)

    # -- gather --------------------------------------------------------------------------

    def gather(self, futures: Any, errors: str = "raise", direct: bool | None = None) -> Any:
        """The values of ``futures`` (a future, or lists/tuples/sets/dicts of them).

        ``errors="raise"`` raises the first failed task's exception; ``"skip"`` leaves
        failed (and cancelled) futures out of the result.
        """
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors= takes 'raise' or 'skip', got {errors!r}")
        return self._sync(self._gather, futures, errors)

    async def _gather(self, futures: Any, errors: str) -> Any:
        return await _transfer.gather(self, futures, errors)

    async def _fetch(self, keys: list[Any], errors: str = "raise") -> dict[Any, Any]:
        """Values of finished ``keys`` (used by ``Future.result``)."""
        return await _transfer.fetch(self, keys, errors)

    async def _rpc(self, msg: dict[str, Any]) -> Any:
        """One request to the scheduler, answered after everything this client sent on its
        stream before it (``client``/``after``): a request never overtakes a message."""
        assert self._pool is not None and self._route is not None
        if not self._closing:
            self._flush_outbox()
        msg["client"] = self.id
        msg["after"] = self._sent
        try:
            async with self._pool.connect(self._route) as stream:
                await stream.send(msg)
                reply = await stream.receive()
        except (
            OSError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.EndOfChannel,
        ) as exc:
            raise TrioSchedulerError(
                f"request {msg.get('op')!r} to the scheduler at {self.scheduler_address} failed: {exc!r}"
            ) from exc
        if reply.get("status") != "OK":
            raise TrioSchedulerError(f"scheduler: {reply.get('text')}")
        return reply["result"]

    # -- scatter ----------------------------------------------------------------------

    def scatter(
        self,
        data: Any,
        workers: Any = None,
        broadcast: bool = False,
        hash: bool = True,
        direct: bool | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Put local data on workers; futures shaped like ``data`` (one, list or dict)."""
        w = check_workers(workers)
        return self._sync(_transfer.scatter, self, data, w, broadcast, hash, timeout)

    # -- cancel, retry, fire-and-forget ----------------------------------------------------

    def cancel(self, futures: Any, force: bool = False, reason: str = "") -> Any:
        """Stop computing ``futures``; ``force`` cancels them for every client."""
        return self._sync(self._cancel, futures, force, reason)

    async def _cancel(self, futures: Any, force: bool, reason: str) -> None:
        keys = list(dict.fromkeys(f.key for f in futures_of(futures)))
        if not keys:
            return
        self._emit(
            m.CancelKeys(self._next_stimulus("cancel"), trio.current_time(), self.id, keys, force)
        )
        with self._lock:
            states = [self._futures.pop(k, None) for k in keys]
        for st in states:
            if st is not None and st.status != "cancelled":
                st.cancel(reason or "cancelled by the client")
        await trio.lowlevel.checkpoint()

    def retry(self, futures: Any) -> Any:
        """Run erred ``futures`` (and their erred dependencies) again."""
        return self._sync(self._retry, futures)

    async def _retry(self, futures: Any) -> None:
        fs = futures_of(futures)
        keys = list(dict.fromkeys(f.key for f in fs if f._state.status == "error"))
        for f in fs:
            if f._state.status == "error":
                f._state.reset()
        if keys:
            self._emit(
                m.RetryKeys(self._next_stimulus("retry"), trio.current_time(), self.id, keys)
            )
        await trio.lowlevel.checkpoint()

    # -- functions on every worker ---------------------------------------------------------

    def run(
        self,
        function: Callable[..., Any],
        *args: Any,
        workers: Any = None,
        on_error: str = "raise",
        **kwargs: Any,
    ) -> Any:
        """``function(*args, **kwargs)`` on each worker (or ``workers=``), outside the task
        system: ``{worker address: result}``. A function that takes ``dask_worker=`` gets
        the ``Worker``. ``on_error``: ``"raise"`` the first failure (original type),
        ``"return"`` the exception as that worker's result, or ``"ignore"`` (left out)."""
        if on_error not in ("raise", "return", "ignore"):
            raise ValueError(f"on_error= takes 'raise', 'return' or 'ignore', got {on_error!r}")
        payload = cloudpickle.dumps((function, args, kwargs), protocol=5)
        return self._sync(_transfer.run_on_workers, self, payload, check_workers(workers), on_error)

    def run_on_scheduler(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)`` in the scheduler's process (on its trio loop, so
        keep it short); one that takes ``dask_scheduler=`` gets the ``Scheduler``."""
        payload = cloudpickle.dumps((function, args, kwargs), protocol=5)
        return self._sync(self._run_on_scheduler, payload)

    async def _run_on_scheduler(self, payload: bytes) -> Any:
        reply = await self._rpc({"op": "run_function", "function": payload})
        if "error" in reply:
            raise unpack_exception(*reply["error"])
        return reply["result"]

    def upload_file(self, filename: str, load: bool = True) -> Any:
        """Make a ``.py``, ``.zip`` or ``.egg`` file importable on every worker.

        Installed (and, with ``load=True``, imported) on the workers now, and on every
        worker that joins or restarts later. A file that fails to import on any worker
        raises that error (original type, e.g. ``SyntaxError``) with every worker's error
        in its notes; the workers keep running and the file is not kept. With
        ``load=False`` nothing is imported at upload: a task's ``import`` reads the file.
        """
        name, data = _upload.read_upload(filename)
        return self._sync(self._upload_file, name, data, load)

    async def _upload_file(self, name: str, data: bytes, load: bool = True) -> dict[str, Any]:
        reply = await self._rpc(
            {"op": "upload_file", "filename": name, "data": data, "load": load}
        )
        errors: dict[str, list[Any]] = reply["errors"]
        if errors:
            first: BaseException | None = None
            lines = []
            for worker, (blob, tb_blob, text) in sorted(errors.items()):
                lines.append(f"  {worker}: {text}")
                if first is None and blob is not None:
                    first = unpack_exception(blob, tb_blob or b"", text)
            exc = (
                first if first is not None else TrioSchedulerError(f"upload_file({name!r}) failed")
            )
            exc.add_note(
                f"upload_file({name!r}) failed on {len(errors)} of {len(reply['workers'])} "
                "workers (they keep running; the file was not kept):\n" + "\n".join(lines)
            )
            raise exc
        return {w: "OK" for w in reply["workers"]}

    # -- published datasets ---------------------------------------------------------------

    def publish_dataset(
        self, *args: Any, name: Any = None, override: bool = False, **kwargs: Any
    ) -> Any:
        """Publish futures or (persisted) collections under names, for any client.

        ``publish_dataset(x=df)``, ``publish_dataset(df, name="x")``, or collections
        alone (named by their dask name). The scheduler keeps their data in cluster
        memory until ``unpublish_dataset``, also after this client disconnects. An
        existing name raises ``DatasetExistsError`` (a ``KeyError``) unless ``override``.
        """
        items = [
            [n, *datasets.pack(value)]
            for n, value in datasets.dataset_names(args, name, kwargs).items()
        ]
        return self._sync(self._publish, items, override)

    async def _publish(self, items: list[list[Any]], override: bool) -> None:
        error = await self._rpc({"op": "publish_put", "items": items, "override": override})
        if error is not None:
            raise datasets.DatasetExistsError(error)

    def list_datasets(self) -> Any:
        """The names of the published datasets."""
        return self._sync(self._rpc, {"op": "publish_list"})

    def get_dataset(self, name: Any, default: Any = _NO_DEFAULT) -> Any:
        """The dataset published as ``name``, its futures now held by this client.

        An unknown name raises ``KeyError`` naming it, or returns ``default`` if given.
        """
        return self._sync(self._get_dataset, name, default)

    async def _get_dataset(self, name: Any, default: Any) -> Any:
        [blob] = await self._rpc({"op": "publish_get", "names": [name]})
        if blob is None:
            if default is _NO_DEFAULT:
                raise KeyError(f"dataset {name!r} is not published")
            return default
        return datasets.unpack(blob, self)

    def unpublish_dataset(self, name: Any) -> Any:
        """Forget dataset ``name`` (its data is released unless a client holds it);
        returns the names that were published (unknown names are ignored)."""
        names = name if isinstance(name, list) else [name]
        return self._sync(self._rpc, {"op": "publish_delete", "names": names})

    # -- restart ----------------------------------------------------------------------------

    def restart(self, timeout: float = 60.0, wait_for_workers: bool = True) -> Any:
        """Restart every worker and cancel every future of every client.

        Nannies restart their worker processes; an in-process ``LocalCluster`` of this
        client gets new workers; other workers without a nanny are closed (a deployment
        may bring them back). Futures end ``cancelled``, their error saying the cluster
        was restarted. Published datasets are dropped.
        """
        return self._sync(self._restart, timeout, wait_for_workers)

    async def _restart(self, timeout: float, wait_for_workers: bool) -> None:  # noqa: ASYNC109
        cluster = self.cluster
        in_process = cluster is not None and getattr(cluster, "processes", True) is False
        with trio.fail_after(timeout):
            n_before = len(await self._rpc({"op": "nthreads"}))
            with self._lock:
                held = dict(self._futures)
            reply = await self._rpc(
                {"op": "restart", "timeout": timeout, "close_workers": not in_process}
            )
            # Our keys were released without a message each (a late KeyCancelled could
            # cancel a future submitted again after the restart): cancel them here.
            with self._lock:
                for key, st in held.items():
                    if self._futures.get(key) is st:
                        del self._futures[key]
            for st in held.values():
                st.cancel(RESTART_REASON)
            if in_process and reply["plain"]:
                n = len(cluster.workers)
                await cluster.scale_to(0)
                await cluster.scale_to(n)
            if reply["errors"]:
                raise TrioSchedulerError(
                    "restart: "
                    + "; ".join(f"{w}: {text}" for w, text in sorted(reply["errors"].items()))
                )
            if wait_for_workers:
                expected = n_before if in_process or not reply["plain"] else len(reply["restarted"])
                await self._rpc({"op": "wait_for_workers", "n_workers": expected})

    # -- cluster information ----------------------------------------------------------

    def scheduler_info(self) -> Any:
        """``{"type", "address", "workers": {address: {name, nthreads, memory_limit, ...}}}``."""
        return self._sync(self._rpc, {"op": "scheduler_info"})

    def who_has(self, futures: Any = None) -> Any:
        """``{key: [worker addresses]}`` for ``futures`` (all keys if None)."""
        keys = None if futures is None else list(dict.fromkeys(f.key for f in futures_of(futures)))
        return self._sync(self._who_has, keys)

    async def _who_has(self, keys: list[Any] | None) -> dict[Any, list[str]]:
        return {k: v for k, v in await self._rpc({"op": "who_has", "keys": keys})}

    def has_what(self, workers: Any = None) -> Any:
        """``{worker address: [keys]}``."""
        return self._sync(self._rpc, {"op": "has_what", "workers": check_workers(workers)})

    def nthreads(self, workers: Any = None) -> Any:
        """``{worker address: threads}`` of running workers."""
        return self._sync(self._rpc, {"op": "nthreads", "workers": check_workers(workers)})

    ncores = nthreads

    def wait_for_workers(self, n_workers: int = 1, timeout: float | None = None) -> Any:
        """Until at least ``n_workers`` workers are connected (``TimeoutError`` after ``timeout``)."""
        if not isinstance(n_workers, int) or n_workers < 0:
            raise ValueError(f"n_workers must be a non-negative integer, got {n_workers!r}")
        return self._sync(self._wait_for_workers, n_workers, timeout)

    async def _wait_for_workers(self, n_workers: int, timeout: float | None) -> None:  # noqa: ASYNC109
        with trio.move_on_after(float("inf") if timeout is None else timeout):
            await self._rpc({"op": "wait_for_workers", "n_workers": n_workers})
            return
        raise TimeoutError(
            f"only {len(await self._rpc({'op': 'nthreads'}))} of {n_workers} workers "
            f"joined the scheduler at {self.scheduler_address} within {timeout} s"
        )


Executor = Client


@asynccontextmanager
async def _tolerant_batched(
    stream: wire.Stream, interval: float
) -> AsyncIterator[wire.BatchedSend]:
    """``open_batched`` whose final flush ignores a stream the scheduler already closed."""
    try:
        async with wire.open_batched(stream, interval, direct=True) as batched:
            yield batched
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def fire_and_forget(obj: Any) -> None:
    """Keep computing these futures' tasks even when no future for them is left."""
    by_client: dict[Client, list[Any]] = defaultdict(list)
    for f in futures_of(obj):
        by_client[f.client].append(f.key)
    for client, keys in by_client.items():
        client._post(client._emit_desire, keys, m.FIRE_AND_FORGET)


def _is_our_future(x: Any) -> bool:
    return type(x) is Future


def _require_trio(what: str) -> None:
    """The asynchronous client runs in the caller's trio task tree; under another event
    loop trio's primitives fail deep inside with "Task got bad yield": say so first."""
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return
    if library == "trio":
        return
    hint = ""
    if library == "asyncio":
        hint = (
            ". Under asyncio, use the sync Client (it runs its own event loop in a thread) "
            "and call its blocking methods through asyncio.to_thread, e.g. "
            "'await asyncio.to_thread(client.submit(f, x).result)'"
        )
    raise RuntimeError(f"{what} runs under trio (trio.run), not {library}{hint}")
