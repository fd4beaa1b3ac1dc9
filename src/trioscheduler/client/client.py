"""The Client: dask.distributed's futures API over one scheduler stream.

A facade: ``Client`` gathers methods by concern -- its own futures API here (submit,
map, dask collections, gather, scatter, cancel, retry), cluster administration
(``admin.AdminMethods``: run, upload_file, restart, cluster information), published
datasets (``datasets.DatasetMethods``) and IPython kernels in the servers
(``ipython.IPythonMethods``) -- over ``base.ClientBase``, the session, loop
and futures table they all use. A new concern gets a module of its own, not more
lines here.

Dask collections: ``compute``/``persist``/``get`` turn graphs into tasks with
``client.collections``; a sync client is dask's scheduler while it is open.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from itertools import islice
from typing import TYPE_CHECKING, Any

import trio

from trioscheduler.client import transfer as _transfer
from trioscheduler.client.actors import as_actor
from trioscheduler.client.admin import AdminMethods
from trioscheduler.client.base import ClientBase, ClientClosedError, default_client
from trioscheduler.client.collections import (
    collections_to_graph,
    flatten_keys,
    graph_to_tasks,
    repack,
)
from trioscheduler.client.context import ContextMethods
from trioscheduler.client.datasets import DatasetMethods
from trioscheduler.client.diagnostics import DiagnosticsMethods
from trioscheduler.client.events import EventMethods
from trioscheduler.client.executor import ExecutorMethods
from trioscheduler.client.futures import Future, FutureHost, futures_of
from trioscheduler.client.ipython import IPythonMethods
from trioscheduler.client.keys import (
    check_key,
    check_options,
    check_workers,
    map_namer,
    plain,
    shippable,
    submit_key,
)
from trioscheduler.client.plugins import PluginMethods
from trioscheduler.client.workers import WorkerMethods
from trioscheduler.core import messages as m
from trioscheduler.wire import runspec

MAP_BATCH = 10_000
"""Tasks per graph message of a ``map`` (its ``batch_size`` when none is given)."""

__all__ = ["Client", "ClientClosedError", "Executor", "default_client", "fire_and_forget"]


class Client(
    ContextMethods,
    ExecutorMethods,
    DiagnosticsMethods,
    EventMethods,
    WorkerMethods,
    AdminMethods,
    DatasetMethods,
    IPythonMethods,
    PluginMethods,
    ClientBase,
):
    """Connect to a scheduler (or start a ``LocalCluster``) and submit work to it.

    ``address``: ``"tcp://host:port"``, ``"inproc://name"``, a ``LocalCluster`` (or
    anything with ``.scheduler_address``), or ``None`` to start a local cluster with
    ``**cluster_kwargs`` (``n_workers``, ``threads_per_worker``, ``processes``,
    ``memory_limit``...), closed again with the client.
    """

    # -- new futures ---------------------------------------------------------------------

    def _new_futures(self, specs: list[m.TaskSpec]) -> list[Future]:
        """Futures for ``specs``; tasks whose key this client already has are not resent."""
        futures: list[Future] = []
        fresh: list[m.TaskSpec] = []
        table = self.futures
        with table.lock:
            if self.status != "running":
                raise ClientClosedError(f"{self!r} is not running")
            for spec in specs:
                st, new = table.hold(spec.key)
                if new:
                    fresh.append(spec)
                futures.append(Future(spec.key, self, st))
            if fresh:
                self._post(self._emit_graph, fresh)
        return futures

    def _emit_graph(self, specs: list[m.TaskSpec], keys: list[Any] | None = None) -> None:
        self._link.emit(
            m.UpdateGraph(
                self._link.stimulus("update-graph"),
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
        table = self.futures
        with table.lock:
            if self.status != "running":
                raise ClientClosedError(f"{self!r} is not running")
            for key in dict.fromkeys(wanted):
                st, is_new = table.hold(key)
                if is_new:
                    new.append(key)
                futures[key] = Future(key, self, st)
            if tasks or new:
                self._post(self._emit_graph, tasks, new)
        return futures

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
        actor: bool = False,
        actors: bool = False,
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
        if actor or actors:  # an instance kept on the worker; its result is an Actor
            key = submit_key(func, args, kwargs, False) if key is None else key
            func = as_actor(func)
        if key is None:
            key = submit_key(func, args, kwargs, pure)
        else:
            check_key(key)
        st = self.futures.hold_existing(key)
        if st is not None:
            return Future(key, self, st)
        plain_spec = None if kwargs or not plain(args) else runspec.pack_plain_call(func, args)
        run_spec: runspec.RunSpec
        deps: list[Any]
        if plain_spec is not None:
            run_spec, deps = plain_spec, []
        else:
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
        actor: bool = False,
        actors: bool = False,
        **kwargs: Any,
    ) -> list[Future]:
        """``submit`` over the zipped ``iterables`` (up to the shortest, as builtin ``map``).

        ``key`` is a prefix for the generated keys or a list of keys. The calls are
        named, pickled and sent ``batch_size`` at a time (``MAP_BATCH`` if ``None``),
        each batch a graph of its own: the scheduler starts on the first while the next
        is being made, and a sync client writes each batch before making the next, so
        the client holds at most one batch of run specs and an iterator of millions of
        items is read as it goes.
        """
        if not callable(func):
            raise TypeError("the first argument of map must be a callable function")
        if not iterables:
            return []
        if any(isinstance(it, (dict, str)) for it in iterables):
            raise TypeError("map() iterates over sequences of arguments, not a dict or str")
        if batch_size is None:
            batch_size = MAP_BATCH
        elif isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise TypeError(f"batch_size= takes a number of tasks >= 1, got {batch_size!r}")
        w, r, n_retries, prio, aow = check_options(
            workers, resources, retries, priority, allow_other_workers
        )
        if isinstance(key, (list, tuple)):  # the keys must match the calls: count them first
            seqs = [it if isinstance(it, (list, tuple)) else list(it) for it in iterables]
            n = min(len(seq) for seq in seqs)
            if len(key) != n:
                raise ValueError(f"map() got {len(key)} keys for {n} tasks")
            iterables = tuple(seqs)
        calls = zip(*iterables)  # noqa: B905 - stops at the shortest, as builtin map and dask
        name = map_namer(func, kwargs, key, pure and not (actor or actors))
        if actor or actors:
            func = as_actor(func)
        shipped: Any = None  # shippable(func), made when a call needs runspec.pack
        pack = runspec.pack
        pack_plain: Callable[[tuple[Any, ...]], runspec.RunSpec] | None = None
        if plain(tuple(kwargs.values())):  # C-pickled calls, the function by reference or once
            pack_plain = runspec.plain_packer(func, kwargs) or runspec.shared_packer(func, kwargs)
        TaskSpec = m.TaskSpec
        run_spec: runspec.RunSpec
        deps: list[Any]
        futures: list[Future] = []
        while batch := list(islice(calls, batch_size)):
            if futures:  # a batch went before: on the wire before the next is made
                self._flush_sent()
            keys = name(batch, len(futures))
            specs: list[m.TaskSpec] = []
            packed: dict[Any, m.TaskSpec] = {}
            for k, args in zip(keys, batch, strict=True):
                spec = packed.get(k)  # the same pure call twice in one batch: pack it once
                if spec is None:
                    if pack_plain is not None and plain(args):
                        run_spec, deps = pack_plain(args), []
                    else:
                        if shipped is None:
                            shipped = shippable(func)
                        run_spec, deps = pack(shipped, args, kwargs)
                    spec = packed[k] = TaskSpec(k, deps, run_spec, prio, 0, w, aow, r, n_retries)
                specs.append(spec)
            del packed, batch, keys
            futures.extend(self._new_futures(specs))
            del specs
        return futures

    def _flush_sent(self) -> None:
        """A sync client in another thread than its loop: until everything this client
        posted is written to the scheduler (an asynchronous client does not wait)."""
        if not self.asynchronous and threading.get_ident() != self._loop_ident:
            self.sync(self._link.flush)

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
            return self.sync(self._gather_one, results, singleton)
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
        return self.sync(self._get_values, keys, flat, futures)

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
        return self.sync(self._gather, futures, errors)

    async def _gather(self, futures: Any, errors: str) -> Any:
        return await _transfer.gather(self, futures, errors)

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
        return self.sync(_transfer.scatter, self, data, w, broadcast, hash, timeout)

    # -- cancel, retry, fire-and-forget ----------------------------------------------------

    def cancel(self, futures: Any, force: bool = False, reason: str = "") -> Any:
        """Stop computing ``futures``; ``force`` cancels them for every client."""
        return self.sync(self._cancel, futures, force, reason)

    async def _cancel(self, futures: Any, force: bool, reason: str) -> None:
        keys = list(dict.fromkeys(f.key for f in futures_of(futures)))
        if not keys:
            return
        self._link.emit(
            m.CancelKeys(self._link.stimulus("cancel"), trio.current_time(), self.id, keys, force)
        )
        for st in self.futures.drop(keys):
            if st.status != "cancelled":
                st.cancel(reason or "cancelled by the client")
        await trio.lowlevel.checkpoint()

    def retry(self, futures: Any) -> Any:
        """Run erred ``futures`` (and their erred dependencies) again."""
        return self.sync(self._retry, futures)

    async def _retry(self, futures: Any) -> None:
        fs = futures_of(futures)
        keys = list(dict.fromkeys(f.key for f in fs if f._state.status == "error"))
        for f in fs:
            if f._state.status == "error":
                f._state.reset()
        if keys:
            self._link.emit(
                m.RetryKeys(self._link.stimulus("retry"), trio.current_time(), self.id, keys)
            )
        await trio.lowlevel.checkpoint()


Executor = Client


def fire_and_forget(obj: Any) -> None:
    """Keep computing these futures' tasks even when no future for them is left."""
    by_client: dict[ClientBase, list[Any]] = defaultdict(list)
    for f in futures_of(obj):
        by_client[f.client].append(f.key)
    for client, keys in by_client.items():
        client._post(client._emit_desire, keys, m.FIRE_AND_FORGET)


if TYPE_CHECKING:  # mypy checks that a Client gives a Future all it needs

    def _client_is_a_future_host(client: Client) -> FutureHost:
        return client
