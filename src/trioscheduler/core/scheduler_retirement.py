"""Workers leaving in order, and copies of keys going away: retirement and replica drops.

A retiring worker (``RetireWorker``) copies its unique keys to running workers
(``AcquireReplicas``) and closes once none is left; ``DropReplicas`` removes copies where
another stays and no task running there reads it.

The Active Memory Manager runs dask's default policy, ReduceReplicas
(``replication.reduce_replicas``), here, on the ``Tick`` that comes ``amm_interval``
seconds (of the events' ``now``) after its last run, so the simulator and the cluster
machine drive it like any other decision; ``ActiveMemoryManager`` starts, stops or runs
it once (``client.amm``). It waits while a restarted scheduler awaits its workers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from trioscheduler.core import scheduler_transitions as tr
from trioscheduler.core.messages import (
    AcquireReplicas,
    ActiveMemoryManager,
    CloseWorker,
    DropReplicas,
    Key,
    RetireWorker,
    WorkerAddr,
)
from trioscheduler.core.replication import reduce_replicas
from trioscheduler.core.scheduler_records import WorkerRecord

if TYPE_CHECKING:
    from trioscheduler.core.scheduler import SchedulerState


def on_retire(s: SchedulerState, ev: RetireWorker) -> None:
    ws = s.workers.get(ev.worker)
    if ws is None or ws.status in ("closing", "closed"):
        return
    ws.status = "closing"
    ws.retire_requested = {}
    s.retiring.add(ws.address)
    s.update_worker_sets(ws)
    s.rebuild_running()
    retire_progress(s, ws)


def on_drop_replicas(s: SchedulerState, ev: DropReplicas) -> None:
    ws = s.workers.get(ev.worker)
    if ws is not None:
        drop_replicas(s, ws, ev.keys)


def drop_replicas(s: SchedulerState, ws: WorkerRecord, keys: Iterable[Key]) -> int:
    """Drop copies only where another copy stays and no task running there reads it;
    how many went."""
    tasks = s.tasks
    n = 0
    for key in keys:
        ts = tasks.get(key)
        if ts is None or ts.state != "memory" or ws.address not in ts.who_has:
            continue
        if len(ts.who_has) < 2:
            continue
        if any(d in tasks and tasks[d].processing_on == ws.address for d in ts.dependents):
            continue
        tr.remove_replica(s, ts, ws)
        s.free_on(ws.address, key)
        n += 1
    return n


def run_amm(s: SchedulerState) -> None:
    """ReduceReplicas once: drop the copies no running or queued task needs, keep one."""
    n = 0
    workers = s.workers
    for addr, keys in sorted(reduce_replicas(s).items()):
        ws = workers.get(addr)
        if ws is not None:
            n += drop_replicas(s, ws, keys)
    s.amm_dropped += n


def amm_tick(s: SchedulerState, now: float) -> None:
    """At a ``Tick``: run the AMM if its interval has passed since its last run."""
    interval = s.amm_interval
    if interval is None or s.recovery is not None:
        return
    due = s.amm_due
    if due is None:  # the first tick since it started (or since a restart)
        s.amm_due = now + interval
    elif now >= due:
        s.amm_due = now + interval
        run_amm(s)


def on_amm(s: SchedulerState, ev: ActiveMemoryManager) -> None:
    action = ev.action
    if action == "start":
        if not ev.interval >= 0:
            s.log_msg("warning", f"active memory manager: bad interval {ev.interval!r}")
            return
        s.amm_interval = ev.interval
        s.amm_due = ev.now + ev.interval
    elif action == "stop":
        s.amm_interval = s.amm_due = None
    elif action == "run_once":
        run_amm(s)
    else:
        s.log_msg("warning", f"active memory manager: unknown action {action!r}")


def retire_pending(s: SchedulerState) -> None:
    """After any event while workers retire: a unique key may have been released
    (not replicated), which no retirement event reports; close those now done."""
    for addr in sorted(s.retiring):
        ws = s.workers.get(addr)
        if ws is not None:
            retire_progress(s, ws)
    if s.recs:
        s.drain()


def retire_progress(s: SchedulerState, ws: WorkerRecord) -> None:
    """Copy the retiring worker's unique keys away; close it once none is left."""
    if ws.status != "closing" or ws.retire_requested is None:
        return
    unique = [k for k in ws.has_what if len(s.tasks[k].who_has) == 1]
    if not unique:
        s.emit(CloseWorker(ws.address, "retired"))
        s.remove_worker(ws, expected=True, reason="retired")
        return
    others = s.running
    if not others:
        s.log_msg(
            "warning",
            f"cannot retire {ws.address}: no other running worker can take its "
            f"{len(unique)} unique keys; it keeps running",
        )
        ws.status = "running"
        ws.retire_requested = None
        s.retiring.discard(ws.address)
        s.rebuild_running()
        s.update_worker_sets(ws)
        s.recheck_unrunnable()
        return
    requested = ws.retire_requested
    batches: dict[WorkerAddr, AcquireReplicas] = {}
    for key in unique:
        target = requested.get(key)
        if target is not None and target in s.workers:
            if s.workers[target].status == "running":
                continue
        tws = others[s.round_robin % len(others)]
        s.round_robin += 1
        requested[key] = tws.address
        msg = batches.get(tws.address)
        if msg is None:
            msg = batches[tws.address] = AcquireReplicas(s.stimulus_id, s.now, {}, {})
        msg.who_has[key] = [ws.address]
        msg.nbytes[key] = s.tasks[key].nbytes
    for taddr, msg in batches.items():
        s.to_worker(taddr, msg)
