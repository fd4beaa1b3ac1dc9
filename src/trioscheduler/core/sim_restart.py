"""The simulated scheduler crashes and restarts from its log (``ClusterSimulator``).

What ``Scheduler(recover_from=)`` and the worker and client shells do around a restart,
minus processes and files: the new scheduler core is the old one's log replayed
(``Recorder.resume``), told it ``Recovered``; every message in flight to or from the
old one is lost, and so is every effect of the new one until its peers are back (they
are not connected). Each worker's core hears ``SchedulerLost`` (its running tasks are
cancelled, its values kept) and registers again with what it holds, unless it died with
the scheduler (then the scheduler removes it when ``grace`` has passed). Each client
says hello again and wants the keys it holds.

Used by the hypothesis cluster machine's "scheduler restarts" rule; kept out of
``simulator.py`` so that the machine's other rules do not pay for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from trioscheduler.core.messages import (
    FIRE_AND_FORGET,
    AddClient,
    AddWorker,
    ClientDesiresKeys,
    Log,
    Recovered,
    SchedulerLost,
    ToScheduler,
)
from trioscheduler.core.recorder import DEFAULTS, Recorder

if TYPE_CHECKING:
    from trioscheduler.core.simulator import ClusterSimulator

SCHEDULER = "scheduler"


def record_scheduler(sim: ClusterSimulator) -> None:
    """Log the (fresh) scheduler core's events from now on, so it can restart."""
    core = sim.scheduler_core
    if type(core) is Recorder:
        return
    settings: dict[str, Any] = {}
    for name in DEFAULTS["scheduler"]:
        settings[name] = core.log.keys.maxlen if name == "story_length" else getattr(core, name)
    sim.scheduler_core = Recorder(core, settings)


def restart_scheduler(sim: ClusterSimulator, grace: float, dead: Iterable[str] = ()) -> None:
    """Crash the scheduler and start it again from its log; workers in ``dead`` died
    with it (their messages and values are gone), the others and every client return."""
    log = sim.scheduler_log  # (raises unless recorded: see ``record_scheduler``)
    old_tasks = sim.scheduler.tasks
    for pair in list(sim.queues):
        if SCHEDULER in pair:
            del sim.queues[pair]  # in flight when the process died
    core = Recorder.resume(log)
    sim.scheduler_core = core
    sid, now = sim._sid("recovered")
    effects = sim._scheduler_handle([Recovered(sid, now, grace, [FIRE_AND_FORGET])])
    sim.logs.extend(e for e in effects if type(e) is Log)  # the rest finds nobody connected
    oracle = sim.oracle
    if oracle is not None:  # its suspicion counts follow the tasks into the new records
        new_tasks = sim.scheduler.tasks
        for key, (rec, n) in list(oracle.deaths.items()):
            if old_tasks.get(key) is rec and key in new_tasks:
                oracle.deaths[key] = (new_tasks[key], n)
    for addr in sorted(dead):
        w = sim.workers.pop(addr, None)
        if w is not None:
            sim.departed.append(w)
            sim.lost += 1
            if oracle is not None:
                sim._runs_ended(w, w.running)
    for addr in sorted(sim.workers):
        w = sim.workers[addr]
        sid, now = sim._sid("scheduler-lost")
        out = w.core.handle(SchedulerLost(sid, now))
        sim._obey(w, [i for i in out if type(i) is not ToScheduler])  # no stream to send on
        sid, now = sim._sid("rejoin")
        held = w.state.held()
        sim._to_scheduler(
            AddWorker(sid, now, addr, w.nthreads, w.memory_limit, dict(w.resources), w.name, data=held)
        )
    for client in sorted(sim.wants):
        sid, now = sim._sid("reconnect")
        sim._to_scheduler(AddClient(sid, now, client))
        keys = sorted(sim.wants[client], key=repr)
        if keys:
            sid, now = sim._sid("reconnect")
            sim._to_scheduler(ClientDesiresKeys(sid, now, client, keys))
