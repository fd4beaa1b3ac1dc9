"""Where a task should run: restrictions, resources, data locality, estimated load.

A pure policy over ``SchedulerState``: it reads workers and tasks and returns a worker
(or None: no valid worker, the task goes to ``no-worker``). The cost of a worker is
dask's objective: the time until a thread is free there (``occupancy / nthreads``) plus
the time to move the dependency bytes it does not hold (``bytes / bandwidth``).

The common path stays O(dependency holders): tasks without dependencies take any idle
worker, else round robin over running workers; only restricted tasks look at the
whole (filtered) pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from trioscheduler.core.scheduler import SchedulerState
    from trioscheduler.core.scheduler_records import TaskRecord, WorkerRecord

SMALL_POOL: Final = 20  # below this many workers, compare them all instead of round robin


def has_resources(ws: WorkerRecord, needs: dict[str, float]) -> bool:
    """The worker's total supply covers the task (the worker enforces concurrency)."""
    have = ws.resources
    return all(have.get(name, 0.0) >= amount for name, amount in needs.items())


def _restricted_to(s: SchedulerState, ts: TaskRecord) -> set[str]:
    assert ts.worker_restrictions is not None
    aliases = s.aliases
    workers = s.workers
    hosts = s.hosts
    out: set[str] = set()
    for w in ts.worker_restrictions:
        addr = aliases.get(w, w)
        if addr not in workers:  # a worker that left: its successor of the same name
            name = s.former_names.get(addr)
            if name is not None:
                addr = aliases.get(name, addr)
        if addr in workers:
            out.add(addr)
        elif w in hosts:  # a host name or IP: every worker on that host (as dask)
            out.update(hosts[w])
        else:
            out.add(addr)  # not here (yet): the task waits in no-worker
    return out


def satisfies(s: SchedulerState, ts: TaskRecord, ws: WorkerRecord) -> bool:
    """May ``ts`` run on ``ws``? (For stealing: preferences count as hard here.)"""
    if ws.status != "running":
        return False
    if ts.worker_restrictions is not None and ws.address not in _restricted_to(s, ts):
        return False
    rr = ts.resource_restrictions
    return rr is None or has_resources(ws, rr)


def valid_workers(s: SchedulerState, ts: TaskRecord) -> list[WorkerRecord] | None:
    """Running workers ``ts`` may use, or None when any running worker will do.

    With ``allow_other_workers`` the worker list is a preference: used when one of
    them runs, ignored otherwise. Resources are always a hard constraint.
    """
    pool: list[WorkerRecord] | None = None
    if ts.worker_restrictions is not None:
        workers = s.workers
        pool = []
        for addr in _restricted_to(s, ts):
            ws = workers.get(addr)
            if ws is not None and ws.status == "running":
                pool.append(ws)
        if not pool and ts.allow_other_workers:
            pool = None
    rr = ts.resource_restrictions
    if rr:
        pool = [ws for ws in (s.running if pool is None else pool) if has_resources(ws, rr)]
        if not pool and ts.allow_other_workers and ts.worker_restrictions is not None:
            pool = [ws for ws in s.running if has_resources(ws, rr)]
    return pool


def _best(s: SchedulerState, ts: TaskRecord, pool: list[WorkerRecord]) -> WorkerRecord:
    """The worker of ``pool`` that would finish ``ts`` soonest."""
    tasks = s.tasks
    local: dict[str, int] = {}
    total = 0
    for dk in ts.dependencies:
        dts = tasks[dk]
        nb = dts.nbytes
        total += nb
        for addr in dts.who_has:
            local[addr] = local.get(addr, 0) + nb
    bw = s.bandwidth
    best = pool[0]
    best_cost = (
        best.occupancy / best.nthreads + (total - local.get(best.address, 0)) / bw,
        best.nbytes,
        best.address,  # ties broken by address: the choice never depends on set order
    )
    for ws in pool[1:]:
        cost = (
            ws.occupancy / ws.nthreads + (total - local.get(ws.address, 0)) / bw,
            ws.nbytes,
            ws.address,
        )
        if cost < best_cost:
            best, best_cost = ws, cost
    return best


def decide_worker(s: SchedulerState, ts: TaskRecord) -> WorkerRecord | None:
    """Pick the worker for ``ts``, or None if no valid worker exists now."""
    ex = ts.extra
    restricted = ex is not None and (
        ex.worker_restrictions is not None or ex.resource_restrictions is not None
    )
    if restricted:
        pool = valid_workers(s, ts)
        if pool is not None:
            if not pool:
                return None
            return pool[0] if len(pool) == 1 else _best(s, ts, pool)
    deps = ts.dependencies
    if deps:
        workers = s.workers
        tasks = s.tasks
        seen: set[str] = set()
        candidates: list[WorkerRecord] = []
        for dk in deps:
            for addr in tasks[dk].who_has:
                if addr not in seen:
                    seen.add(addr)
                    ws = workers[addr]
                    if ws.status == "running":
                        candidates.append(ws)
        if s.idle:
            ws = next(iter(s.idle.values()))
            if ws.address not in seen:
                candidates.append(ws)
        if candidates:
            return candidates[0] if len(candidates) == 1 else _best(s, ts, candidates)
    elif not restricted:
        return _co_assign(s, ts)
    return _least_busy(s)


def _co_assign(s: SchedulerState, ts: TaskRecord) -> WorkerRecord | None:
    """A root task without queuing: consecutive tasks of a prefix go to one worker, its
    share of the group (``n_tasks * nthreads / total threads``), then the next worker
    (dask's co-assignment): siblings of a reduction land together, transfers are few."""
    tp = ts.prefix
    if tp.last_worker_left > 0 and tp.last_worker is not None:
        ws = s.workers.get(tp.last_worker)
        if ws is not None and ws.status == "running":
            tp.last_worker_left -= 1
            return ws
    ws = _least_busy(s)
    if ws is not None:
        tp.last_worker = ws.address
        tp.last_worker_left = tp.n_tasks * ws.nthreads // max(s.total_nthreads, 1) - 1
    return ws


def _least_busy(s: SchedulerState) -> WorkerRecord | None:
    if s.idle:
        return next(iter(s.idle.values()))
    running = s.running
    if not running:
        return None
    if len(running) <= SMALL_POOL:
        return min(running, key=lambda ws: ws.occupancy / ws.nthreads)
    ws = running[s.round_robin % len(running)]
    s.round_robin += 1
    return ws


def describe_restrictions(ts: TaskRecord) -> str:
    """What keeps ``ts`` off every worker, for the error of a task no worker can take."""
    parts = []
    if ts.worker_restrictions is not None:
        parts.append(f"workers={sorted(map(str, ts.worker_restrictions))}")
    if ts.resource_restrictions is not None:
        parts.append(f"resources={dict(ts.resource_restrictions)}")
    return ", ".join(parts) or "its placement (no restriction, but no worker can take it)"
