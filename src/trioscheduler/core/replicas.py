"""Copies of keys as workers report them: taken, dropped, missing; and scatter numbers.

The scheduler counts a copy of a key on a worker (``TaskRecord.who_has``) from what the
worker says: a joining worker's data and ``AddKeys`` (``worker_has``), a dropped copy
(``ReleaseWorkerData``), a copy a peer did not find (``MissingData``). Each report may
have crossed a ``FreeKeys`` or a scatter on its way, so each handler decides whether the
copy it names is the one counted now.

Scatters are numbered per worker (``UpdateData.seqs``): ``note_scatter`` keeps, per
holder's registration, the number of the update that put a key there. ``free_on`` names
it in a ``FreeKeys``, and ``ReleaseWorkerData.seq`` is compared with it, so neither a
stale free nor a stale report of a drop removes a copy that came by a newer scatter
(docs/architecture.md).

Each ``on_*`` function is the handler of one worker event type
(``SchedulerState.handle`` dispatches to it); task state changes go through the table
(``scheduler_transitions``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from trioscheduler.core import scheduler_retirement as retirement
from trioscheduler.core import scheduler_transitions as tr
from trioscheduler.core.messages import (
    AddKeys,
    Key,
    MissingData,
    RefreshWhoHas,
    ReleaseWorkerData,
    WorkerAddr,
)
from trioscheduler.core.scheduler_records import TaskExtra, TaskRecord, WorkerRecord

if TYPE_CHECKING:
    from trioscheduler.core.scheduler import SchedulerState


UNKNOWN_SEQ: Final = 1 << 62
"""A holder's data update a client did not number: a free then drops whatever is there."""


def note_scatter(ts: TaskRecord, seqs: Mapping[WorkerAddr, int], alive: list[WorkerRecord]) -> None:
    """Remember which data update put ``ts`` on each holder: a ``FreeKeys`` sent later
    names it, and the worker keeps a value that came by a newer one (a stale free, sent
    before this news, must not drop it)."""
    if ts.extra is None:
        ts.extra = TaskExtra()
    known = ts.extra.scatter_seqs
    if known is None:
        known = ts.extra.scatter_seqs = {}
    else:
        for ws in [ws for ws in known if ws.status == "closed"]:
            del known[ws]  # a departed registration: its numbers mean nothing now
    for ws in alive:
        seq = seqs.get(ws.address, UNKNOWN_SEQ)
        if seq > known.get(ws, 0):
            known[ws] = seq


def scattered_since(ts: TaskRecord, ws: WorkerRecord, seq: int | None) -> bool:
    """Did the copy of ``ts`` counted on ``ws`` come by a scatter after ``ws``'s data
    update number ``seq`` (which a drop or a "missing" answer of ``ws`` names)? Then
    that drop or answer was about an older value, and the counted copy stays."""
    if seq is None or ts.extra is None or not ts.extra.scatter_seqs:
        return False
    newer = ts.extra.scatter_seqs.get(ws)
    return newer is not None and seq < newer < UNKNOWN_SEQ


def worker_has(s: SchedulerState, ws: WorkerRecord, key: Key, nbytes: int, accept: bool) -> None:
    """``ws`` reports holding ``key``: a replica, new data (if ``accept``), or junk."""
    ts = s.tasks.get(key)
    if ts is None:
        s.free_on(ws.address, key)
        return
    st = ts.state
    if st == "memory":
        if ws.address not in ts.who_has:
            tr.add_replica(s, ts, ws)  # sized as the first copy: sums stay exact
    elif st == "processing" or (accept and st in ("released", "waiting", "no-worker", "queued")):
        # Data we are computing (here or elsewhere) is the result: take it. Freeing it
        # instead would race the ComputeTask already on its way to this worker.
        s.recs.pop(key, None)
        ts.nbytes = nbytes
        s.transition(ts, "memory", worker=ws)
    else:
        s.free_on(ws.address, key)


def on_add_keys(s: SchedulerState, ev: AddKeys) -> None:
    ws = s.workers.get(ev.worker)
    if ws is None:
        return
    for key, nbytes in ev.keys.items():
        worker_has(s, ws, key, nbytes, accept=False)
    for addr in sorted(s.retiring):
        rws = s.workers.get(addr)
        if rws is not None:
            retirement.retire_progress(s, rws)


def on_release_worker_data(s: SchedulerState, ev: ReleaseWorkerData) -> None:
    ws = s.workers.get(ev.worker)
    if ws is None:
        return
    for key in ev.keys:
        ts = s.tasks.get(key)
        if ts is None or ws.address not in ts.who_has:
            continue
        if scattered_since(ts, ws, ev.seq):
            continue  # the copy counted came by a scatter after this drop
        tr.remove_replica(s, ts, ws)
        # counted again since the FreeKeys this answers (a TaskFinished crossed it,
        # or a scatter, which may have put a new copy there): drop any copy it holds
        s.free_on(ws.address, key)
        if not ts.who_has and ts.state == "memory":
            s.recs.pop(key, None)
            s.transition(ts, "released")
    if ws.status == "closing":
        retirement.retire_progress(s, ws)


def on_missing_data(s: SchedulerState, ev: MissingData) -> None:
    ts = s.tasks.get(ev.key)
    if ts is None:
        s.free_on(ev.worker, ev.key)  # forgotten meanwhile: stop looking for it
        return
    errant = s.workers.get(ev.errant_worker)
    if (
        errant is not None
        and errant.address in ts.who_has
        and not scattered_since(ts, errant, ev.errant_seq)  # (else: a stale claim)
    ):
        tr.remove_replica(s, ts, errant)
        # it lacked the key when asked, but may hold it again by now (taken again
        # since, and counted): drop any copy there, as ReleaseWorkerData does
        s.free_on(errant.address, ts.key)
        if not ts.who_has and ts.state == "memory":
            s.recs.pop(ts.key, None)
            s.transition(ts, "released")
    if not ts.who_has:
        # no copy anywhere (lost, or being computed): the worker stops looking; a
        # dependent's next ComputeTask names the holders of the new value. Not if it
        # is to compute the key itself: that ComputeTask overtook this report.
        if ts.processing_on != ev.worker:
            s.free_on(ev.worker, ev.key)
    elif ev.worker in s.workers:
        s.to_worker(ev.worker, RefreshWhoHas(s.stimulus_id, s.now, {ts.key: sorted(ts.who_has)}))
