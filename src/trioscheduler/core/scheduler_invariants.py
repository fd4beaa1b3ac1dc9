"""Every promise the scheduler core makes, checked in one place.

``validate_scheduler(state)`` raises ``AssertionError`` naming the broken rule. Tests
and the hypothesis machine call it after every event; ``SchedulerState(validate=True)``
calls it inside ``handle``. It is O(state) and meant for tests and debugging only.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from trioscheduler.core.scheduler_records import worker_host

if TYPE_CHECKING:
    from trioscheduler.core.scheduler import SchedulerState
    from trioscheduler.core.scheduler_records import TaskRecord

_ACTIVE = ("waiting", "no-worker", "processing", "queued")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)


def _validate_task(s: SchedulerState, ts: TaskRecord) -> None:
    key = ts.key
    tasks = s.tasks
    st = ts.state
    _check(st in s.state_counts and st != "forgotten", f"{key!r}: bad state {st!r}")
    for dk in ts.dependencies:
        _check(dk in tasks, f"{key!r}: dependency {dk!r} forgotten while referenced")
        _check(key in tasks[dk].dependents, f"{key!r}: not a dependent of its dependency {dk!r}")
    n_waiters = 0
    for dk in ts.dependents:
        _check(dk in tasks, f"{key!r}: dependent {dk!r} forgotten while referenced")
        _check(key in tasks[dk].dependencies, f"{key!r}: not a dependency of dependent {dk!r}")
        n_waiters += tasks[dk].state in _ACTIVE
    _check(ts.n_waiters == n_waiters, f"{key!r}: n_waiters {ts.n_waiters} != {n_waiters}")
    for name in ("who_has", "wanted_by"):
        _check(isinstance(getattr(ts, name), (set, frozenset)), f"{key!r}: {name} not a set")
    # ordered collections (replay under any PYTHONHASHSEED takes the same decisions)
    _check(type(ts.dependencies) is tuple, f"{key!r}: dependencies not a tuple")
    _check(len(set(ts.dependencies)) == len(ts.dependencies), f"{key!r}: repeated dependency")
    deps_of = ts.dependents
    _check(
        isinstance(deps_of, dict) or (type(deps_of) is tuple and len(deps_of) == 1),
        f"{key!r}: dependents neither an ordered set nor a lone dependent",
    )
    # holders
    if st == "memory":
        _check(bool(ts.who_has), f"{key!r}: in memory without a holder")
        _check(bool(ts.wanted_by or ts.n_waiters), f"{key!r}: in memory but nobody needs it")
    else:
        _check(not ts.who_has, f"{key!r} ({st}): holders {ts.who_has} but not in memory")
    for addr in ts.who_has:
        ws = s.workers.get(addr)
        _check(ws is not None and ws.status != "closed", f"{key!r}: holder {addr} is not alive")
        assert ws is not None
        _check(key in ws.has_what, f"{key!r}: holder {addr} has_what lacks it")
    # processing
    if st == "processing":
        on = ts.processing_on
        _check(on is not None, f"{key!r}: processing on no worker")
        pws = s.workers.get(on or "")
        _check(pws is not None and pws.status != "closed", f"{key!r}: processing on dead {on}")
        assert pws is not None
        _check(key in pws.processing, f"{key!r}: {on}.processing lacks it")
        for dk in ts.dependencies:
            _check(tasks[dk].state == "memory", f"{key!r}: processing before {dk!r} is in memory")
    else:
        _check(ts.processing_on is None, f"{key!r} ({st}): processing_on {ts.processing_on}")
        _check(key not in s.steals, f"{key!r} ({st}): steal pending but not processing")
    if st == "waiting":
        expect = {dk for dk in ts.dependencies if tasks[dk].state != "memory"}
        _check(ts.n_waiting == len(expect), f"{key!r}: n_waiting {ts.n_waiting} != {expect}")
        _check(bool(expect), f"{key!r}: waiting with nothing to wait for")
    if st == "no-worker":
        _check(key in s.unrunnable, f"{key!r}: no-worker but not in unrunnable")
        for dk in ts.dependencies:
            _check(tasks[dk].state == "memory", f"{key!r}: no-worker before {dk!r} is in memory")
    if st == "queued":
        _check(s.queuing, f"{key!r}: queued though queuing is off")
        _check(key in s.queued, f"{key!r}: queued but not in the queue index")
        for dk in ts.dependencies:
            _check(tasks[dk].state == "memory", f"{key!r}: queued before {dk!r} is in memory")
    else:
        _check(key not in s.queued, f"{key!r} ({st}): in the queue index but not queued")
    if st == "erred":
        _check(ts.exception is not None, f"{key!r}: erred without an exception")
    else:
        _check(ts.exception is None, f"{key!r} ({st}): exception kept outside erred")
    if st == "released":
        _check(not ts.wanted_by and not ts.n_waiters, f"{key!r}: released though needed")
        _check(bool(ts.dependents), f"{key!r}: released with no dependents (should be forgotten)")
    if st in _ACTIVE:
        _check(bool(ts.wanted_by or ts.n_waiters), f"{key!r} ({st}): computing for nobody")
    for c in ts.wanted_by:
        cs = s.clients.get(c)
        _check(cs is not None and key in cs.wants, f"{key!r}: wanted_by {c} disagrees")


def validate_scheduler(s: SchedulerState) -> None:
    """Assert every invariant of ``s``; raise ``AssertionError`` on the first broken one."""
    tasks = s.tasks
    for ts in tasks.values():
        _validate_task(s, ts)
    counts: Counter[str] = Counter(ts.state for ts in tasks.values())
    for st, n in s.state_counts.items():
        if st != "forgotten":
            _check(
                counts.get(st, 0) == n, f"state_counts[{st!r}] = {n}, tasks say {counts.get(st, 0)}"
            )
    _check(
        s.unrunnable.keys() == {k for k, ts in tasks.items() if ts.state == "no-worker"},
        "unrunnable disagrees with no-worker tasks",
    )
    _check(
        s.replicated.keys() == {k for k, ts in tasks.items() if len(ts.who_has) > 1},
        "replicated disagrees with the keys held twice or more",
    )
    incoming: Counter[str] = Counter()
    for key, steal in s.steals.items():
        sts = tasks.get(key)
        _check(
            sts is not None and sts.state == "processing" and sts.processing_on == steal.victim,
            f"steal of {key!r}: not processing on the victim {steal.victim}",
        )
        incoming[steal.thief] += 1
    total_threads = 0
    for addr, ws in s.workers.items():
        _check(ws.address == addr, f"worker {addr} filed under the wrong address")
        _check(
            ws.status in ("running", "paused", "closing", "recovering"),
            f"worker {addr}: status {ws.status}",
        )
        _check(
            ws.status != "recovering" or not ws.processing,
            f"worker {addr}: recovering after a restart, yet processing {list(ws.processing)[:3]}",
        )
        total_threads += ws.nthreads
        nbytes = 0
        for key in ws.has_what:
            hts = tasks.get(key)
            _check(hts is not None and addr in hts.who_has, f"{addr}.has_what has {key!r} wrongly")
            assert hts is not None
            nbytes += hts.nbytes
        _check(nbytes == ws.nbytes, f"{addr}: nbytes {ws.nbytes} != sum of has_what {nbytes}")
        occ = 0.0
        for key, d in ws.processing.items():
            pts = tasks.get(key)
            _check(
                pts is not None and pts.state == "processing" and pts.processing_on == addr,
                f"{addr}.processing has {key!r} wrongly",
            )
            occ += d
        _check(abs(occ - ws.occupancy) < 1e-6 * max(1.0, occ), f"{addr}: occupancy drifted")
        _check(ws.long_running <= ws.processing.keys(), f"{addr}: long_running not processing")
        _check(ws.incoming_steals == incoming.get(addr, 0), f"{addr}: incoming_steals wrong")
        busy = len(ws.processing) - len(ws.long_running)
        idle = ws.status == "running" and busy + ws.incoming_steals < ws.nthreads
        _check((addr in s.idle) == idle, f"{addr}: idle set disagrees")
        sat = busy > ws.nthreads if ws.status == "running" else busy > 0
        _check((addr in s.saturated) == sat, f"{addr}: saturated set disagrees")
        _check((ws.status == "closing") == (addr in s.retiring), f"{addr}: retiring set disagrees")
        if not s.queuing or ws.status != "running":
            _check(addr not in s.open, f"{addr}: open, but not running or no queuing")
        else:  # room -> open -> not full (between the backlog marks: either)
            n = busy + ws.incoming_steals
            if n < ws.queue_slots or ws.occupancy < 0.5 * ws.backlog:
                _check(addr in s.open, f"{addr}: has room but is not open")
            if addr in s.open:
                _check(n < ws.queue_slots or ws.occupancy < ws.backlog, f"{addr}: open but full")
    _check(total_threads == s.total_nthreads, "total_nthreads drifted")
    _check(set(s.idle) <= s.workers.keys(), "idle names unknown workers")
    _check(s.saturated <= s.workers.keys(), "saturated names unknown workers")
    _check(set(s.open) <= s.workers.keys(), "open names unknown workers")
    # the queue: its index agrees with the tasks, each queued task has one live heap
    # entry, and no task stays queued while a worker has room for it
    _check(
        s.queued.keys() == {k for k, ts in tasks.items() if ts.state == "queued"},
        "queue index disagrees with queued tasks",
    )
    live = [e[2] for e in s._queue_heap if s.queued.get(e[2]) == e[1]]
    _check(len(live) == len(s.queued) and set(live) == s.queued.keys(), "queue heap disagrees")
    _check(not (s.queued and s.open), f"tasks queued while {next(iter(s.open), '')} has room")
    running: list[Any] = [ws for ws in s.workers.values() if ws.status == "running"]
    _check({ws.address for ws in s.running} == {ws.address for ws in running}, "running list stale")
    hosts: dict[str, set[str]] = {}
    for addr in s.workers:
        hosts.setdefault(worker_host(addr), set()).add(addr)
    _check(hosts == s.hosts, "hosts index disagrees with workers")
    for name, addr in s.aliases.items():
        _check(addr in s.workers, f"alias {name!r} points to unknown worker {addr}")
    for c, cs in s.clients.items():
        for key in cs.wants:
            cts = tasks.get(key)
            _check(
                cts is not None and c in cts.wanted_by, f"client {c} wants {key!r} inconsistently"
            )
    _check(not s.recs, "recommendations left undrained")
