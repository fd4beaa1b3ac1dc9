"""Work stealing as a pure policy: which queued tasks to move from busy to idle workers.

``plan_steals(state)`` reads the scheduler state on a ``Tick`` and returns
``(key, victim, thief)`` triples; it changes nothing. The scheduler then asks each
victim (``StealRequest``) and moves the task only if the victim confirms it had not
started it, so a wrong guess costs one round trip, never a duplicate run.

A task is worth moving when the bytes of its dependencies the thief lacks take less
than half its expected run time to transfer, and the thief would start it sooner than
the victim. Victims are workers with more tasks than threads (or paused/retiring ones
with any queued task); thieves are running workers with a free thread slot. Tasks are
taken lowest priority first (the ones the victim would start last, so least likely
started: as dask; among equals the most recently assigned), at most ``MAX_EXAMINED`` per victim per tick, so a tick stays cheap
(``heapq.nlargest``: O(n log MAX_EXAMINED) in the victim's queue).

``start_steals`` and ``on_steal_response`` are the scheduler's side of it: they ask the
victims and act on their answers through the scheduler's table (dask's
``move_task_confirm``: queued and dropped there, the task moves to the thief; running or
finished, it stays; any other answer, such as ``released`` or unknown, places it again).
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, Any, Final

from trioscheduler.core import scheduler_transitions as tr
from trioscheduler.core.messages import StealRequest, StealResponse
from trioscheduler.core.placement import satisfies
from trioscheduler.core.scheduler_records import STEAL_CONFIRM, STEAL_REJECT, PendingSteal

if TYPE_CHECKING:
    from trioscheduler.core.scheduler import SchedulerState
    from trioscheduler.core.scheduler_records import TaskRecord

MAX_EXAMINED: Final = 100  # tasks looked at per victim per tick
MAX_THIEVES_TRIED: Final = 8  # thieves compared per task


def _pick_thief(
    s: SchedulerState, ts: TaskRecord, free: dict[str, int], occ: dict[str, float]
) -> tuple[str, float] | None:
    """The thief that would finish ``ts`` soonest, with its transfer time."""
    tasks = s.tasks
    workers = s.workers
    best: tuple[str, float] | None = None
    best_cost = 0.0
    tried = 0
    for addr in free:
        ws = workers[addr]
        if not satisfies(s, ts, ws):
            continue
        missing = 0
        for dk in ts.dependencies:
            dts = tasks[dk]
            if addr not in dts.who_has:
                missing += dts.nbytes
        transfer = missing / s.bandwidth
        cost = occ[addr] + transfer
        if best is None or cost < best_cost:
            best, best_cost = (addr, transfer), cost
        tried += 1
        if tried >= MAX_THIEVES_TRIED:
            break
    return best


def plan_steals(s: SchedulerState) -> list[tuple[Any, str, str]]:
    """Steals to attempt now, as ``(key, victim address, thief address)``."""
    if not s.saturated or not s.idle:
        return []
    free: dict[str, int] = {}
    occ: dict[str, float] = {}
    for addr, ws in s.idle.items():
        n = ws.nthreads - ws.used_slots
        if n > 0:
            free[addr] = n
            occ[addr] = ws.occupancy / ws.nthreads
    if not free:
        return []
    plans: list[tuple[Any, str, str]] = []
    victims = sorted(
        (s.workers[a] for a in s.saturated),
        key=lambda ws: (-ws.occupancy / ws.nthreads, ws.address),
    )
    for victim in victims:
        running = victim.status == "running"
        busy = len(victim.processing) - len(victim.long_running)
        spare = busy - victim.nthreads if running else busy
        vocc = victim.occupancy / victim.nthreads
        tasks = s.tasks
        # lowest priority first (largest priority tuple); among equals the most recently
        # assigned first
        order = heapq.nlargest(
            MAX_EXAMINED, enumerate(victim.processing), key=lambda p: (tasks[p[1]].priority, p[0])
        )
        for _, key in order:
            if spare <= 0:
                break
            if key in s.steals or key in victim.long_running:
                continue
            ts = tasks[key]
            d = victim.processing[key]
            pick = _pick_thief(s, ts, free, occ)
            if pick is None:
                continue
            addr, transfer = pick
            if running and (2 * transfer > d or occ[addr] + transfer >= vocc):
                continue  # not worth the transfer, or the thief would not start it sooner
            plans.append((key, victim.address, addr))
            spare -= 1
            nthreads = s.workers[addr].nthreads
            occ[addr] += d / nthreads
            vocc -= d / victim.nthreads
            free[addr] -= 1
            if not free[addr]:
                del free[addr]
                if not free:
                    return plans
    return plans


def start_steals(s: SchedulerState) -> None:
    """Ask the victims of ``plan_steals`` to give their tasks up; the thieves' slots are
    reserved until the answers come."""
    for key, victim, thief in plan_steals(s):
        tws = s.workers[thief]
        s.steals[key] = PendingSteal(victim, thief, s.stimulus_id)
        tws.incoming_steals += 1
        s.update_worker_sets(tws)
        s.to_worker(victim, StealRequest(s.stimulus_id, s.now, key))


def on_steal_response(s: SchedulerState, ev: StealResponse) -> None:
    pending = s.steals.get(ev.key)
    if (
        pending is None
        or pending.victim != ev.worker
        or pending.stimulus_id != ev.stimulus_id  # the worker echoes the request's id
    ):
        return  # late or duplicate answer, or one to an earlier request: settled already
    del s.steals[ev.key]
    thief = s.workers.get(pending.thief)
    if thief is not None:
        thief.incoming_steals -= 1
        s.update_worker_sets(thief)
    ts = s.tasks.get(ev.key)
    if ts is None or ts.state != "processing" or ts.processing_on != pending.victim:
        return
    if ev.state in STEAL_REJECT:
        return  # the victim already runs it (or has finished): the steal failed
    s.recs.pop(ts.key, None)
    if ev.state in STEAL_CONFIRM and thief is not None and satisfies(s, ts, thief):
        tr.move_processing(s, ts, thief)
    else:
        # the victim does not hold it queued (released, unknown) or the thief is gone
        # or unfit: decide again where it runs (dask's move_task_confirm reschedules)
        s.transition(ts, "waiting")
