"""A restarted scheduler's state, rebuilt from its log, meets the peers coming back.

Replaying the log (``recorder.replay``) gives the state the old process had when it
died: workers connected, tasks processing on them, clients wanting keys. None of those
connections survived. ``Recovered`` says so, and these rules reconcile:

* every worker becomes ``recovering``: nothing new is placed on it, but its replicas are
  kept (its process most likely survived and serves them to peers: see
  ``server/worker.py``'s ``_rejoin``). What it was *processing* is rescheduled at once:
  a worker that loses its scheduler cancels its running tasks (``SchedulerLost``). No
  suspicion is counted: the scheduler died, not the worker.
* a recovering worker that registers again (``AddWorker`` at its address) keeps exactly
  the replicas it reports (``AddWorker.data``); the others are gone and recomputed from
  lineage if still needed. Keys it holds that the log lost track of are taken as results
  (``replicas.worker_has``), as for any joining worker.
* clients (except ``keep``: the shell's own holders, such as published datasets) have
  ``grace`` seconds to come back (``AddClient`` with their id); one that does not is
  removed, so its keys are released. A worker that does not come back by then is
  removed too, and its replicas with it.
* times in the log are the old process's clock: every stored time is reset to ``now``.

All of it is pure: the hypothesis cluster machine crashes its scheduler and restarts it
from the log (``tests/property/test_cluster_machine.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trioscheduler.core import scheduler_transitions as tr
from trioscheduler.core.messages import FIRE_AND_FORGET, AddWorker, Recovered

if TYPE_CHECKING:
    from trioscheduler.core.scheduler import SchedulerState

RECOVERING = "recovering"


class Recovery:
    """What is still awaited after a restart, and until when."""

    __slots__ = ("deadline", "clients")

    def __init__(self, deadline: float, clients: set[str]) -> None:
        self.deadline = deadline
        self.clients = clients


def on_recovered(s: SchedulerState, ev: Recovered) -> None:
    now = ev.now
    keep = set(ev.keep)
    keep.add(FIRE_AND_FORGET)
    tasks = s.tasks
    for ws in list(s.workers.values()):
        ws.status = RECOVERING
        ws.last_seen = now
        ws.retire_requested = None
        s.retiring.discard(ws.address)
        s.update_worker_sets(ws)
    s.rebuild_running()
    for ws in list(s.workers.values()):
        for key in sorted(ws.processing, key=repr):  # sorted: replays agree
            ts = tasks[key]
            s.recs.pop(key, None)
            s.transition(ts, "waiting")
    for key in list(s.unrunnable):
        s.unrunnable[key] = now
    awaited = set()
    for cs in s.clients.values():
        cs.last_seen = now
        if cs.client not in keep:
            awaited.add(cs.client)
    s.recovery = Recovery(now + ev.grace, awaited)
    s.amm_due = None  # the log's times are the old clock's: the AMM starts counting again


def client_back(s: SchedulerState, client: str) -> None:
    rec = s.recovery
    if rec is not None:
        rec.clients.discard(client)
        _maybe_done(s)


def worker_back(s: SchedulerState, ev: AddWorker) -> None:
    """``ev.worker`` was ``recovering``: keep what it still holds, drop the rest of its
    record (``_on_add_worker`` then registers it afresh, taking ``ev.data`` back)."""
    ws = s.workers[ev.worker]
    tasks = s.tasks
    for key in list(ws.has_what):
        if key in ev.data:
            # detached without being released: replicas.worker_has adds the new replica
            tr.remove_replica(s, tasks[key], ws)
    _maybe_done(s)


def expire(s: SchedulerState, now: float) -> None:
    """At a ``Tick``: past the deadline, whoever did not come back is gone."""
    rec = s.recovery
    if rec is None or now < rec.deadline:
        return
    s.recovery = None
    for addr in sorted(s.workers):
        ws = s.workers[addr]
        if ws.status == RECOVERING:
            s.remove_worker(
                ws, expected=True, reason="did not return after the scheduler restarted"
            )
    for client in sorted(rec.clients):
        s.drop_client(client)


def _maybe_done(s: SchedulerState) -> None:
    rec = s.recovery
    if rec is None or rec.clients:
        return
    if any(ws.status == RECOVERING for ws in s.workers.values()):
        return
    s.recovery = None

