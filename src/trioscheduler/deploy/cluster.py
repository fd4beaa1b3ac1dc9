"""A scheduler and its workers on this machine: ``LocalCluster`` and ``open_cluster``.

``processes=True`` (the default) runs the scheduler in this process and each worker in
its own process under a ``Nanny``, over TCP on ``host``; ``start_method`` (``"auto"``,
``"fork"``, ``"spawn"``; see ``trioscheduler.server.nanny``) says how those processes start.
``processes=False`` runs the scheduler and the workers in one trio loop over
``inproc://``: nothing is serialized, which suits tests and small jobs.

Each worker (or nanny) is held open by one task of the cluster's worker nursery, so
workers start and stop concurrently and closing the cluster closes all of them (nannies
reap their processes) before the scheduler stops. A sync ``LocalCluster`` lives inside
the process-wide background loop (``trioscheduler.deploy.loop``); an asynchronous one, or
``open_cluster``, inside the caller's trio program.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from trioscheduler import wire
from trioscheduler.deploy import adaptive as _adaptive
from trioscheduler.deploy.facade import SyncAsyncFacade
from trioscheduler.http import DEFAULT_DASHBOARD_ADDRESS, resolve_dashboard_address
from trioscheduler.server.nanny import Nanny
from trioscheduler.server.scheduler import Scheduler
from trioscheduler.server.worker import Worker
from trioscheduler.wire.security import Security
from trioscheduler.wire.security import resolve as resolve_security

logger = logging.getLogger("trioscheduler.cluster")

_cluster_ids = itertools.count(1)

# dask's ``loop=`` is deprecated there and has no meaning here: accepted, as dask does.
_IGNORED = ("loop",)
_PROTOCOLS = ("tcp", "tls", "inproc")


def _check_worker_kwargs(worker_kwargs: dict[str, Any], processes: bool) -> None:
    """Refuse a keyword the workers would not take now, before anything starts: dask
    raises the worker's TypeError later, from inside the cluster's start-up."""
    kind = Nanny if processes else Worker
    accepted = set(inspect.signature(kind.__init__).parameters) - {"self"}
    unknown = sorted(set(worker_kwargs) - accepted)
    if not unknown:
        return
    if "python" in unknown and not processes:
        raise ValueError(
            "LocalCluster(python=...) starts each worker in another interpreter, which "
            "needs worker processes: pass processes=True (threads run in this interpreter)"
        )
    where = "Nanny (processes=True)" if processes else "Worker (processes=False)"
    raise TypeError(
        f"LocalCluster got keyword(s) {', '.join(map(repr, unknown))} that its workers "
        f"do not take: not a parameter of {where}"
    )


def _protocol(protocol: str | None, processes: bool, security: Security | None) -> str:
    """dask's choice: given, else tls with security, else inproc in-process, else tcp."""
    if protocol is None:
        if security is not None and security.require_encryption:
            return "tls"
        return "tcp" if processes else "inproc"
    scheme = protocol.removesuffix("://")
    if scheme not in _PROTOCOLS:
        raise ValueError(f"LocalCluster(protocol={protocol!r}): use tcp://, tls:// or inproc://")
    if scheme == "inproc" and processes:
        raise ValueError("LocalCluster(protocol='inproc://') needs processes=False")
    if scheme == "tls" and (security is None or not security.enabled):
        raise ValueError(
            "LocalCluster(protocol='tls://') needs certificates: pass security=True "
            "(a temporary CA) or security=Security(...)"
        )
    if scheme == "tcp" and security is not None and security.require_encryption:
        raise ValueError(
            "LocalCluster(protocol='tcp://') with a security that requires encryption: "
            "use tls:// (or Security(require_encryption=False))"
        )
    return scheme


def _interface_host(interface: str) -> str:
    """The IPv4 address of a network interface (dask's ``interface=``)."""
    import socket

    import psutil

    addrs = psutil.net_if_addrs()
    if interface not in addrs:
        raise ValueError(
            f"LocalCluster(interface={interface!r}): no such network interface; "
            f"this machine has {', '.join(sorted(addrs))}"
        )
    for a in addrs[interface]:
        if a.family == socket.AF_INET:
            return str(a.address)
    raise ValueError(f"LocalCluster(interface={interface!r}) has no IPv4 address")


def _log_level(silence_logs: Any) -> str | None:
    """dask's ``silence_logs`` (a level, or False) as the workers' log level."""
    if silence_logs is None or silence_logs is True:
        return None
    if silence_logs is False:
        return "info"
    if isinstance(silence_logs, int):
        return logging.getLevelName(silence_logs).lower()
    if isinstance(silence_logs, str) and silence_logs.lower() in (
        "debug", "info", "warning", "error", "critical"
    ):  # fmt: skip
        return silence_logs.lower()
    raise ValueError(f"LocalCluster(silence_logs={silence_logs!r}): give a logging level or False")


def default_sizes(
    n_workers: int | None, threads_per_worker: int | None, processes: bool, cores: int | None = None
) -> tuple[int, int]:
    """``(n_workers, threads_per_worker)`` as dask chooses them: workers x threads = cores.

    With processes, up to 4 cores get one single-threaded worker each; more cores are
    split into about sqrt(cores) workers. Without processes, one worker with every core.
    """
    cores = cores or os.cpu_count() or 1
    if n_workers is None and threads_per_worker is None:
        if not processes:
            return 1, cores
        if cores <= 4:
            return cores, 1
        n = min(f for f in range(1, cores + 1) if cores % f == 0 and f >= math.sqrt(cores))
        return n, cores // n
    if n_workers is None:
        assert threads_per_worker is not None
        return max(1, cores // threads_per_worker), threads_per_worker
    if threads_per_worker is None:
        return n_workers, max(1, cores // max(1, n_workers))
    return n_workers, threads_per_worker


class LocalCluster(SyncAsyncFacade):
    """``with LocalCluster(n_workers=2) as cluster: Client(cluster)``.

    Also ``async with LocalCluster(..., asynchronous=True)`` inside trio. ``workers``
    maps names to the running ``Worker``/``Nanny`` objects; ``scale(n)`` adds or removes
    workers (awaitable when asynchronous). Other keyword arguments go to each worker
    (``resources=``, ``local_directory=``, ...).

    ``dashboard_address``: dask's ``":8787"`` by default (a free port if it is taken,
    and no dashboard if the ``dashboard`` extra is not installed), ``0`` or
    ``"127.0.0.1:0"`` for a free port, None for none. With no host it listens on
    ``host`` (127.0.0.1 by default); ``dashboard_link`` says where.
    """

    def __init__(
        self,
        n_workers: int | None = None,
        threads_per_worker: int | None = None,
        processes: bool = True,
        memory_limit: str | float | None = "auto",
        host: str = "127.0.0.1",
        scheduler_port: int = 0,
        asynchronous: bool = False,
        *,
        worker_timeout: float = 30.0,
        worker_log_level: str = "warning",
        start_method: str | None = None,
        security: Security | bool | None = None,
        protocol: str | None = None,
        interface: str | None = None,
        silence_logs: Any = None,
        dashboard_address: str | int | None = DEFAULT_DASHBOARD_ADDRESS,
        scheduler_kwargs: dict[str, Any] | None = None,
        record: str | os.PathLike[str] | None = None,
        **worker_kwargs: Any,
    ) -> None:
        # dask's: more keywords for the Scheduler (``recover_from=``, ``record=``...)
        self.scheduler_kwargs = dict(scheduler_kwargs or {})
        # ``record``: a directory for every core's event log (scheduler.log, worker-NAME.log)
        self.record = Path(record) if record is not None else None
        if self.record is not None:
            self.record.mkdir(parents=True, exist_ok=True)
            self.scheduler_kwargs.setdefault("record", self.record / "scheduler.log")
        for name in _IGNORED:
            worker_kwargs.pop(name, None)
        _check_worker_kwargs(worker_kwargs, processes)
        self.security = resolve_security(security)
        self.protocol = _protocol(protocol, processes, self.security)
        if interface is not None:
            host = _interface_host(interface)
        worker_log_level = _log_level(silence_logs) or worker_log_level
        self.n_workers, self.threads_per_worker = default_sizes(
            n_workers, threads_per_worker, processes
        )
        self.processes = processes
        self.memory_limit = memory_limit
        self.host = host
        self.scheduler_port = scheduler_port
        self.asynchronous = asynchronous
        self.worker_timeout = worker_timeout
        self.worker_log_level = worker_log_level
        self.start_method = start_method
        # an explicit address without the extra fails here, in the caller's thread
        self.dashboard_address = resolve_dashboard_address(dashboard_address)
        self.worker_kwargs = worker_kwargs
        self.scheduler: Scheduler | None = None
        self.scheduler_address = ""
        self.workers: dict[str, Worker | Nanny] = {}
        self.status = "created"
        self._stops: dict[str, tuple[trio.Event, trio.Event]] = {}  # name -> (stop, gone)
        self._names = itertools.count()
        self._nursery: trio.Nursery | None = None
        self._life: AbstractAsyncContextManager[Any] | None = None  # _open(), while open
        self._handle: Any = None
        self._id = next(_cluster_ids)
        self._adaptive: _adaptive.Adaptive | None = None
        self._adaptive_options: dict[str, Any] = {}
        if not asynchronous:
            from trioscheduler.deploy.loop import loop_runner

            self._handle = loop_runner().enter(self._open(), name=f"LocalCluster-{self._id}")

    def _totals(self) -> tuple[int, int, int]:
        """(workers, threads, memory) as the scheduler knows them (dask's repr)."""
        state = self.scheduler.state if self.scheduler is not None else None
        records = list(state.workers.values()) if state is not None else []
        if not records:
            return len(self.workers), len(self.workers) * self.threads_per_worker, 0
        threads = sum(ws.nthreads for ws in records)
        return len(records), threads, sum(ws.memory_limit or 0 for ws in records)

    def __repr__(self) -> str:
        from dask.utils import format_bytes

        n, threads, memory = self._totals()
        return (
            f"LocalCluster({self._id}, {self.scheduler_address!r}, workers={n}, "
            f"threads={threads}, memory={format_bytes(memory)})"
        )

    def _repr_html_(self) -> str:
        from html import escape

        from dask.utils import format_bytes

        n, threads, memory = self._totals()
        kind = "processes" if self.processes else "threads in this process"
        return (
            f"<div><h3>LocalCluster</h3><table>"
            f"<tr><th>Scheduler</th><td>{escape(self.scheduler_address)}</td></tr>"
            f"<tr><th>Workers</th><td>{n} ({kind})</td></tr>"
            f"<tr><th>Threads</th><td>{threads}</td></tr>"
            f"<tr><th>Memory</th><td>{format_bytes(memory)}</td></tr>"
            f"<tr><th>Status</th><td>{escape(self.status)}</td></tr>"
            f"</table></div>"
        )

    # -- the cluster's life ----------------------------------------------------------

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[LocalCluster]:
        if self.protocol != "inproc":
            address = f"{self.protocol}://{self.host}:{self.scheduler_port}"
        else:
            address = f"inproc://cluster-{os.getpid()}-{self._id}"
        self.status = "starting"
        try:
            async with Scheduler(
                address,
                worker_timeout=self.worker_timeout,
                security=self.security,
                dashboard_address=self.dashboard_address,
                **self.scheduler_kwargs,
            ) as scheduler:
                self.scheduler = scheduler
                self.scheduler_address = scheduler.address
                async with wire.background_nursery() as nursery:  # errors unwrapped
                    self._nursery = nursery
                    try:
                        await self.scale_to(self.n_workers)
                        self.status = "running"
                        logger.info("%r started", self)
                        yield self
                    finally:
                        self.status = "closing"  # leaving cancels every worker at once
        finally:
            self.workers.clear()
            self._stops.clear()
            self._nursery = None
            self.status = "closed"

    def _make(self, name: str) -> Worker | Nanny:
        kwargs: dict[str, Any] = dict(
            nthreads=self.threads_per_worker,
            memory_limit=self.memory_limit,
            nworkers=self.n_workers,
            name=name,
            security=self.security,
            **self.worker_kwargs,
        )
        if self.record is not None:
            kwargs["record"] = self.record / f"worker-{name}.log"
        if self.processes:
            return Nanny(
                self.scheduler_address,
                host=self.host,
                log_level=self.worker_log_level,
                start_method=self.start_method,
                **kwargs,
            )
        if self.protocol != "inproc":  # threads, but over the network as asked
            kwargs["address"] = f"{self.protocol}://{self.host}:0"
        return Worker(self.scheduler_address, **kwargs)

    async def _hold(self, name: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        stop, gone = trio.Event(), trio.Event()
        try:
            async with self._make(name) as worker:
                self.workers[name] = worker
                self._stops[name] = (stop, gone)
                task_status.started()
                async with trio.open_nursery() as race:  # scaled down, or closed on its own

                    async def until(wait: Any) -> None:
                        await wait()
                        race.cancel_scope.cancel()

                    race.start_soon(until, stop.wait)
                    race.start_soon(until, worker.finished)
        finally:
            self.workers.pop(name, None)
            self._stops.pop(name, None)
            gone.set()

    def scale(self, n: int) -> Any:
        """Run ``n`` workers: start new ones or close the newest. Awaitable if asynchronous."""
        if self.asynchronous:
            return self.scale_to(n)
        from trioscheduler.deploy.loop import loop_runner

        loop_runner().run(self.scale_to, n)
        return None

    async def scale_to(self, n: int) -> None:
        if self._nursery is None:
            raise RuntimeError("the cluster is not running")
        nursery = self._nursery
        if n > len(self.workers):
            try:
                async with trio.open_nursery() as starters:
                    for _ in range(n - len(self.workers)):
                        starters.start_soon(nursery.start, self._hold, str(next(self._names)))
            except BaseExceptionGroup as group:  # one worker failed to start: say which way
                raise wire.sole_error(group) from None
        elif n < len(self.workers):
            leaving = [self._stops[name] for name in sorted(self.workers, key=int)[n:]]
            for stop, _ in leaving:
                stop.set()
            for _, gone in leaving:
                await gone.wait()

    # -- adaptive scaling ----------------------------------------------------------

    def scale_up(self, n: int) -> Any:
        """Run at least ``n`` workers (dask's ``scale_up``). Awaitable if asynchronous."""
        if self.asynchronous:
            return self._scale_up(n)
        from trioscheduler.deploy.loop import loop_runner

        loop_runner().run(self._scale_up, n)
        return None

    async def _scale_up(self, n: int) -> None:
        if n > len(self.workers):
            await self.scale_to(n)

    def scale_down(self, workers: list[str]) -> Any:
        """Close these workers (addresses or names) gracefully: their unique data goes to
        other workers first. Awaitable if asynchronous."""
        if self.asynchronous:
            return self.retire(workers)
        from trioscheduler.deploy.loop import loop_runner

        loop_runner().run(self.retire, workers)
        return None

    async def retire(self, workers: list[str], timeout: float = 60.0) -> list[str]:  # noqa: ASYNC109
        """``scale_down``'s work: the names of the workers that left."""
        scheduler = self.scheduler
        if scheduler is None or self._nursery is None:
            raise RuntimeError("the cluster is not running")
        by_address = {self._address_of(w): name for name, w in self.workers.items()}
        names: dict[str, str] = {}  # name -> address
        for w in workers:
            name = w if w in self.workers else by_address.get(w)
            if name is None:
                raise ValueError(f"scale_down: {w!r} is not a worker of {self!r}")
            names[name] = self._address_of(self.workers[name])
        for addr in names.values():
            if addr:
                scheduler.retire_worker(addr)
        left: list[str] = []
        with trio.move_on_after(timeout):
            for name, addr in names.items():
                stops = self._stops.get(name)
                while stops is not None and not stops[1].is_set():
                    ws = scheduler.state.workers.get(addr)
                    if ws is not None and ws.status == "running":  # retirement refused
                        break
                    if ws is None:  # gone from the scheduler: stop what holds it
                        stops[0].set()
                        await stops[1].wait()
                        break
                    await trio.sleep(0.02)
                if name not in self.workers:
                    left.append(name)
        return left

    @staticmethod
    def _address_of(worker: Worker | Nanny) -> str:
        return (worker.worker_address if isinstance(worker, Nanny) else worker.address) or ""

    def adapt(
        self, Adaptive: type[_adaptive.Adaptive] = _adaptive.Adaptive, **kwargs: Any  # noqa: N803
    ) -> _adaptive.Adaptive:
        """Scale with the backlog between ``minimum`` and ``maximum`` workers (see
        ``Adaptive`` for ``interval``, ``wait_count``, ``target_duration``...). Replaces
        an earlier ``adapt``, keeping the options it was given unless given again (as
        dask); ``adaptive.stop()`` ends it."""
        options = {**self._adaptive_options, **kwargs}
        adaptive = Adaptive(self, **options)
        self._adaptive_options = options
        if self.asynchronous:
            self._start_adaptive(adaptive)
        else:
            from trioscheduler.deploy.loop import loop_runner

            loop_runner().run(self._start_adaptive_async, adaptive)
        return adaptive

    async def _start_adaptive_async(self, adaptive: _adaptive.Adaptive) -> None:
        self._start_adaptive(adaptive)

    def _start_adaptive(self, adaptive: _adaptive.Adaptive | None) -> None:
        if self._nursery is None:
            raise RuntimeError("the cluster is not running")
        if self._adaptive is not None:
            self._adaptive.stop()
        self._adaptive = adaptive
        if adaptive is not None:
            self._nursery.start_soon(adaptive.run)

    @property
    def dashboard_link(self) -> str | None:
        """``http://127.0.0.1:8787/status``, or None without a dashboard."""
        return self.scheduler.dashboard_link if self.scheduler is not None else None

    @property
    def worker_addresses(self) -> list[str]:
        """The addresses of the running workers (a restarting nanny's may be missing)."""
        out = []
        for w in self.workers.values():
            addr = w.worker_address if isinstance(w, Nanny) else w.address
            if addr:
                out.append(addr)
        return out


@asynccontextmanager
async def open_cluster(
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    processes: bool = True,
    memory_limit: str | float | None = "auto",
    **kwargs: Any,
) -> AsyncIterator[LocalCluster]:
    """``async with open_cluster(2, processes=False) as cluster:`` in a trio program."""
    cluster = LocalCluster(
        n_workers,
        threads_per_worker,
        processes,
        memory_limit,
        asynchronous=True,
        **kwargs,
    )
    async with cluster:
        yield cluster
