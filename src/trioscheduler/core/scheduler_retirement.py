"""Workers leaving in order, and copies of keys going away: retirement and replica drops.

A retiring worker (``RetireWorker``) copies its unique keys to running workers
(``AcquireReplicas``) and closes once none is left; ``DropReplicas`` removes copies where
another stays and no task running there reads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trioscheduler.core import scheduler_transitions as tr
from trioscheduler.core.messages import (
    AcquireReplicas,
    CloseWorker,
    DropReplicas,
    RetireWorker,
    WorkerAddr,
)
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
    """Drop copies only where another copy stays and no task running there reads it."""
    ws = s.workers.get(ev.worker)
    if ws is None:
        return
    for key in ev.keys:
        ts = s.tasks.get(key)
        if ts is None or ts.state != "memory" or ws.address not in ts.who_has:
            continue
        if len(ts.who_has) < 2:
            continue
        tasks = s.tasks
        if any(d in tasks and tasks[d].processing_on == ws.address for d in ts.dependents):
            continue
        tr.remove_replica(s, ts, ws)
        s.free_on(ws.address, key)


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
