"""Every state change of a worker task, as a ``(start, finish) -> function`` table.

h11's rule: nothing outside this module assigns ``WorkerTask.state``; an edge that is not
in ``TRANSITIONS`` raises ``InvalidTransition`` with the key's story. A transition function
mutates the state, appends instructions to ``out`` and returns recommendations
(``{task: finish}``) that ``drain`` applies until none are left.

States (the table at the bottom is the authority; this is the picture)::

    released ─▶ waiting ─▶ ready | constrained ─▶ executing ──────────▶ memory | error
       │ └──────────────────▶ ▲  (resources)         │ secede               ▲
       │   inputs all here (one step)                │                      │
       │                                             ▼                      │
       │                                        long-running ───────────────┘
       └─▶ fetch ─▶ flight ─▶ memory
            ▲ │ ◀────┘ failed: try another holder
            │ ▼
           missing    (no holder left: MissingData; RefreshWhoHas brings it back)

    executing | long-running | flight ─freed─▶ cancelled ─asked again─▶ as before | resumed
    freed or rescheduled ─▶ released ─▶ forgotten (dropped from ``tasks``)
    memory ─freed, no local reader─▶ forgotten (one step)

``cancelled``: the scheduler freed a task whose thread or transfer is still running
(``previous`` says which); its outcome is dropped. ``resumed``: the scheduler wants the
task again, but the other way (``next``: ``waiting`` after a transfer, ``fetch`` after an
execution); the running outcome is used if it succeeds, else it becomes ``next`` (a
transfer-then-compute task keeps its ``ComputeTask`` in ``pending_compute`` until then).

``dependents`` holds the *active* local tasks needing a key (waiting, ready,
constrained, executing, long-running, or cancelled/resumed while their thread runs):
a key is kept for them even after the scheduler frees it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, cast

from trioscheduler.core.empty import EMPTY
from trioscheduler.core.errors import InvalidTransition
from trioscheduler.core.messages import Execute, MissingData, TaskFinished, ToScheduler

if TYPE_CHECKING:
    from trioscheduler.core.worker import WorkerState
    from trioscheduler.core.worker_task import WorkerTask

Recs = dict["WorkerTask", str]
Transition = Callable[["WorkerState", "WorkerTask", str, float, list[Any]], "Recs | None"]

RUNNING_STATES: Final = frozenset({"executing", "long-running"})
"""States (or ``previous`` of cancelled/resumed) whose thread is running the task."""
ACTIVE_STATES: Final = frozenset({"waiting", "ready", "constrained", "executing", "long-running"})
"""States of a task that still reads its dependencies (it is in their ``dependents``)."""
DATA_STATES: Final = frozenset({"memory", "fetch", "flight", "missing"})
"""States of a key kept while local dependents need it, even when the scheduler frees it."""


def is_active(ts: WorkerTask) -> bool:
    """Does ``ts`` still need its dependencies?"""
    st = ts.state
    return st in ACTIVE_STATES or (
        (st == "cancelled" or st == "resumed") and ts.previous in RUNNING_STATES
    )


def _set(ws: WorkerState, ts: WorkerTask, finish: str, stim: str, now: float) -> None:
    ak, a_s, af, ai, an = ws._story_append
    ak(ts.key)
    a_s(ts.state)
    af(finish)
    ai(stim)
    an(now)
    ts.state = finish


# ----------------------------------------------------------------------------- helpers


def _attach(ts: WorkerTask) -> Recs:
    """``ts`` starts waiting: register it with its dependencies, fetch the absent ones."""
    recs: Recs = {}
    waiting: set[WorkerTask] | None = None
    for dep in ts.dependencies:
        if dep.dependents:
            dep.dependents[ts] = None
        else:
            dep.dependents = {ts: None}
        st = dep.state
        if st == "memory":
            continue
        if waiting is None:
            waiting = {dep}
        else:
            waiting.add(dep)
        if st == "released" or st == "error":
            if not dep.priority or ts.priority < dep.priority:
                dep.priority = ts.priority
            recs[dep] = "fetch"
        elif st == "cancelled":
            recs[dep] = "flight" if dep.previous == "flight" else "resumed"
        elif st == "missing" and dep.who_has:  # the new ComputeTask named holders
            recs[dep] = "fetch"
    if waiting is None:
        ts.waiting_for_data = EMPTY
        recs[ts] = "constrained" if ts.resources else "ready"
    else:
        ts.waiting_for_data = waiting
    return recs


def _detach(ws: WorkerState, ts: WorkerTask, recs: Recs) -> None:
    """``ts`` no longer reads its dependencies: drop keys nobody needs any more.

    Its ``dependencies`` are cleared too: a finished or released task needs no inputs
    (a new ``ComputeTask`` sets them again), and old references would pin forgotten
    records in memory.
    """
    ts.waiting_for_data = EMPTY
    for dep in ts.dependencies:
        dependents = dep.dependents
        if ts in dependents:
            del dependents[ts]
        if dependents:
            continue
        st = dep.state
        if st == "released":
            recs[dep] = "forgotten"
        elif dep.wanted:
            continue
        elif st == "flight":
            recs[dep] = "cancelled"
        elif st == "memory":
            recs[dep] = "forgotten"  # nobody here reads it, the scheduler does not count it
        elif st in DATA_STATES:
            recs[dep] = "released"
        elif st == "resumed" and dep.next == "fetch":
            recs[dep] = "cancelled"
    ts.dependencies = ()  # done with its inputs: hold no references to forgotten tasks


def _after_release(ts: WorkerTask, recs: Recs) -> Recs:
    if not ts.dependents:
        recs[ts] = "forgotten"
    return recs


def _enter_memory(ws: WorkerState, ts: WorkerTask, stim: str, now: float) -> Recs:
    """Store ``ts`` (the shell holds its value) and wake the dependents waiting for it."""
    _set(ws, ts, "memory", stim, now)
    ws._store(ts)
    recs: Recs = {}
    for dt in ts.dependents:
        waiting = dt.waiting_for_data
        if ts in waiting:  # so a set of its own, not the shared empty
            cast("set[WorkerTask]", waiting).discard(ts)
            if not waiting and dt.state == "waiting":
                recs[dt] = "constrained" if dt.resources else "ready"
    return recs


def _leave_thread(ws: WorkerState, ts: WorkerTask) -> None:
    """The thread running ``ts`` is done: free its slot and resources."""
    ws.executing.discard(ts)
    ws.long_running.discard(ts)
    if ts.resources:
        avail = ws.available_resources
        for r, q in ts.resources.items():
            avail[r] = avail.get(r, 0.0) + q


def _report_added(ws: WorkerState, ts: WorkerTask) -> None:
    ts.wanted = True  # the scheduler will count us as a holder; it decides when to free
    ws._added[ts.key] = ts.nbytes


def _enter_fetch(ws: WorkerState, ts: WorkerTask, stim: str, now: float) -> Recs | None:
    _set(ws, ts, "fetch", stim, now)
    if not ts.who_has:
        return {ts: "missing"}
    ws._push_fetch(ts)
    return None


def _enter_waiting(ws: WorkerState, ts: WorkerTask, stim: str, now: float) -> Recs:
    _set(ws, ts, "waiting", stim, now)
    return _attach(ts)


# ----------------------------------------------------------------------------- released


def released_waiting(
    ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]
) -> Recs:
    return _enter_waiting(ws, ts, stim, now)


def released_fetch(
    ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]
) -> Recs | None:
    return _enter_fetch(ws, ts, stim, now)


def released_ready(
    ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]
) -> Recs | None:
    """A ``ComputeTask`` whose inputs are all in memory here: ``waiting`` is skipped (one
    transition, one story entry and no recommendation round instead of two)."""
    return _enter_ready(ws, ts, "ready", stim, now)


def released_constrained(
    ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]
) -> Recs | None:
    """As ``released_ready``, for a task that needs resources."""
    return _enter_ready(ws, ts, "constrained", stim, now)


def _enter_ready(
    ws: WorkerState, ts: WorkerTask, finish: str, stim: str, now: float
) -> Recs | None:
    for dep in ts.dependencies:
        if dep.state != "memory":  # the handler's check went stale: the long way round
            return _enter_waiting(ws, ts, stim, now)
    for dep in ts.dependencies:
        if dep.dependents:
            dep.dependents[ts] = None
        else:
            dep.dependents = {ts: None}
    ts.waiting_for_data = EMPTY
    _set(ws, ts, finish, stim, now)
    ws._push_ready(ts, ws._constrained if finish == "constrained" else ws._ready)
    return None


def released_memory(ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]) -> Recs:
    return _enter_memory(ws, ts, stim, now)


def released_forgotten(
    ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]
) -> None:
    _set(ws, ts, "forgotten", stim, now)
    del ws.tasks[ts.key]


# ----------------------------------------------------------------------------- waiting


def waiting_ready(ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]) -> None:
    _set(ws, ts, "ready", stim, now)
    ws._push_ready(ts, ws._ready)


def waiting_constrained(
    ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]
) -> None:
    _set(ws, ts, "constrained", stim, now)
    ws._push_ready(ts, ws._constrained)


def active_released(ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]) -> Recs:
    """waiting/ready/constrained -> released; heap entries go stale (lazy deletion)."""
    _set(ws, ts, "released", stim, now)
    recs: Recs = {}
    _detach(ws, ts, recs)
    return _after_release(ts, recs)


def ready_executing(ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]) -> None:
    """Take a thread slot: load spilled inputs back first, then ``Execute``."""
    for dep in ts.dependencies:
        if dep.key in ws.spilled:
            ws._unspill(dep, out)
        else:
            ws._touch(dep)
    ws.executing.add(ts)
    if ts.resources:
        avail = ws.available_resources
        for r, q in ts.resources.items():
            avail[r] = avail.get(r, 0.0) - q
    _set(ws, ts, "executing", stim, now)
    # beyond the thread slots: prefetched, to wait for a busy thread (``ensure_computing``)
    out.append(Execute(ts.key, ts.run_spec, len(ws.executing) > ws.nthreads))


# ----------------------------------------------------------------------------- executing


def running_memory(ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]) -> Recs:
    """executing/long-running -> memory (the handler already sent ``TaskFinished``)."""
    _leave_thread(ws, ts)
    recs = _enter_memory(ws, ts, stim, now)
    _detach(ws, ts, recs)
    return recs


def running_error(ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]) -> Recs:
    _leave_thread(ws, ts)
    _set(ws, ts, "error", stim, now)
    recs: Recs = {}
    _detach(ws, ts, recs)
    return recs


def running_released(
    ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]
) -> Recs:
    """Rescheduled (or a cancelled run ended): the thread is free, nothing is kept."""
    _leave_thread(ws, ts)
    ts.previous = ts.next = None
    _set(ws, ts, "released", stim, now)
    recs: Recs = {}
    _detach(ws, ts, recs)
    return _after_release(ts, recs)


def executing_long_running(
    ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]
) -> None:
    """Seceded: the thread slot is free (resources stay held until it ends, as dask)."""
    ws.executing.discard(ts)
    ws.long_running.add(ts)
    _set(ws, ts, "long-running", stim, now)


def running_cancelled(
    ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]
) -> None:
    ts.previous = ts.state
    ts.next = None
    _set(ws, ts, "cancelled", stim, now)


def secede_cancelled(ws: WorkerState, ts: WorkerTask) -> None:
    """A cancelled/resumed task seceded: free its slot; its state stays (not an edge)."""
    if ts.previous == "executing":
        ts.previous = "long-running"
        ws.executing.discard(ts)
        ws.long_running.add(ts)


# ----------------------------------------------------------------------------- fetching


def fetch_flight(ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]) -> None:
    """Picked into a ``GatherDep`` (``coming_from`` set by the caller)."""
    assert ts.coming_from is not None
    ws.in_flight[ts.coming_from].add(ts)
    _set(ws, ts, "flight", stim, now)


def fetch_missing(ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]) -> None:
    """No holder left: ask the scheduler (it answers with ``RefreshWhoHas``)."""
    ws.missing.add(ts)
    _set(ws, ts, "missing", stim, now)
    out.append(
        ToScheduler(
            MissingData(stim, now, ws.address, ts.key, ts.errant_peer or "", ts.errant_seq)
        )
    )


def fetch_released(ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]) -> Recs:
    ws.missing.discard(ts)
    _set(ws, ts, "released", stim, now)
    return _after_release(ts, {})


def fetch_waiting(ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]) -> Recs:
    """The scheduler wants us to compute a key we were fetching (or missing)."""
    ws.missing.discard(ts)
    return _enter_waiting(ws, ts, stim, now)


def fetch_memory(ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]) -> Recs:
    """Scattered straight to us while we were looking for it."""
    ws.missing.discard(ts)
    return _enter_memory(ws, ts, stim, now)


def missing_fetch(
    ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]
) -> Recs | None:
    ws.missing.discard(ts)
    return _enter_fetch(ws, ts, stim, now)


def flight_memory(ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]) -> Recs:
    ts.coming_from = None
    recs = _enter_memory(ws, ts, stim, now)
    _report_added(ws, ts)
    return recs


def flight_fetch(
    ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]
) -> Recs | None:
    """The transfer failed (the handler removed that peer from ``who_has``)."""
    ts.coming_from = None
    return _enter_fetch(ws, ts, stim, now)


def flight_cancelled(
    ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]
) -> None:
    ts.previous = "flight"
    ts.next = None
    _set(ws, ts, "cancelled", stim, now)


def flight_resumed(ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]) -> None:
    """Asked to compute a key in flight: let the transfer finish, compute if it fails."""
    ts.previous = "flight"
    ts.next = "waiting"
    _set(ws, ts, "resumed", stim, now)


# ----------------------------------------------------------------------------- cancelled / resumed


def cancelled_released(
    ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]
) -> Recs:
    """The cancelled thread or transfer ended; the handler dropped any value it stored."""
    if ts.previous == "flight":
        ts.coming_from = None
        ts.previous = None
        ts.pending_compute = None
        _set(ws, ts, "released", stim, now)
        return _after_release(ts, {})
    return running_released(ws, ts, stim, now, out)


def cancelled_uncancel(
    ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]
) -> None:
    """Asked again for what is still running: simply carry on (finish == previous)."""
    prev = ts.previous
    assert prev is not None
    ts.previous = ts.next = None
    _set(ws, ts, prev, stim, now)


def cancelled_resumed(
    ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]
) -> None:
    """Asked again, the other way: compute after a transfer, fetch after a run."""
    ts.next = "waiting" if ts.previous == "flight" else "fetch"
    _set(ws, ts, "resumed", stim, now)


def resumed_cancelled(
    ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]
) -> None:
    ts.next = None
    ts.pending_compute = None
    _set(ws, ts, "cancelled", stim, now)


def resumed_memory(ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]) -> Recs:
    """The running side succeeded: report it the way the scheduler now expects."""
    prev = ts.previous
    ts.previous = ts.next = None
    if prev == "flight":
        ts.coming_from = None
        ts.pending_compute = None
        recs = _enter_memory(ws, ts, stim, now)
        out.append(
            ToScheduler(
                TaskFinished(stim, now, ws.address, ts.key, ts.nbytes, "", now, now, ts.run_id)
            )
        )
        return recs
    _leave_thread(ws, ts)
    recs = _enter_memory(ws, ts, stim, now)
    _detach(ws, ts, recs)
    _report_added(ws, ts)
    return recs


def resumed_next(
    ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]
) -> Recs | None:
    """The running side failed: become ``next`` (compute it, or fetch it)."""
    prev = ts.previous
    ts.previous = ts.next = None
    if prev == "flight":
        ts.coming_from = None
        assert ts.pending_compute is not None
        ws._set_compute(ts, ts.pending_compute)
        ts.pending_compute = None
        return _enter_waiting(ws, ts, stim, now)
    _leave_thread(ws, ts)
    recs: Recs = {}
    _detach(ws, ts, recs)
    more = _enter_fetch(ws, ts, stim, now)
    if more:
        recs.update(more)
    return recs


def resumed_back(ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]) -> None:
    """Asked for what is actually running (finish == previous): carry on, forget ``next``."""
    prev = ts.previous
    assert prev is not None
    ts.previous = ts.next = None
    ts.pending_compute = None
    _set(ws, ts, prev, stim, now)


# ----------------------------------------------------------------------------- memory / error


def memory_released(ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]) -> Recs:
    ws._drop(ts, out)
    _set(ws, ts, "released", stim, now)
    return _after_release(ts, {})


def memory_forgotten(
    ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]
) -> Recs | None:
    """Freed with no local task reading it: dropped and forgotten in one step (as
    ``memory -> released -> forgotten``, one transition and story entry fewer)."""
    if ts.dependents:  # a task started reading it since the recommendation
        return memory_released(ws, ts, stim, now, out)
    ws._drop(ts, out)
    _set(ws, ts, "forgotten", stim, now)
    del ws.tasks[ts.key]
    return None


def error_released(ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]) -> Recs:
    _set(ws, ts, "released", stim, now)
    return _after_release(ts, {})


def error_waiting(ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]) -> Recs:
    """Retried by the scheduler."""
    return _enter_waiting(ws, ts, stim, now)


def error_fetch(
    ws: WorkerState, ts: WorkerTask, stim: str, now: float, out: list[Any]
) -> Recs | None:
    """Recomputed elsewhere; a local dependent wants the good copy."""
    return _enter_fetch(ws, ts, stim, now)


TRANSITIONS: Final[dict[tuple[str, str], Transition]] = {
    ("released", "waiting"): released_waiting,
    ("released", "fetch"): released_fetch,
    ("released", "ready"): released_ready,
    ("released", "constrained"): released_constrained,
    ("released", "memory"): released_memory,
    ("released", "forgotten"): released_forgotten,
    ("waiting", "ready"): waiting_ready,
    ("waiting", "constrained"): waiting_constrained,
    ("waiting", "released"): active_released,
    ("ready", "executing"): ready_executing,
    ("ready", "released"): active_released,
    ("constrained", "executing"): ready_executing,
    ("constrained", "released"): active_released,
    ("executing", "memory"): running_memory,
    ("executing", "error"): running_error,
    ("executing", "released"): running_released,
    ("executing", "long-running"): executing_long_running,
    ("executing", "cancelled"): running_cancelled,
    ("long-running", "memory"): running_memory,
    ("long-running", "error"): running_error,
    ("long-running", "released"): running_released,
    ("long-running", "cancelled"): running_cancelled,
    ("fetch", "flight"): fetch_flight,
    ("fetch", "missing"): fetch_missing,
    ("fetch", "released"): fetch_released,
    ("fetch", "waiting"): fetch_waiting,
    ("fetch", "memory"): fetch_memory,
    ("missing", "fetch"): missing_fetch,
    ("missing", "released"): fetch_released,
    ("missing", "waiting"): fetch_waiting,
    ("missing", "memory"): fetch_memory,
    ("flight", "memory"): flight_memory,
    ("flight", "fetch"): flight_fetch,
    ("flight", "cancelled"): flight_cancelled,
    ("flight", "resumed"): flight_resumed,
    ("cancelled", "released"): cancelled_released,
    ("cancelled", "executing"): cancelled_uncancel,
    ("cancelled", "long-running"): cancelled_uncancel,
    ("cancelled", "flight"): cancelled_uncancel,
    ("cancelled", "resumed"): cancelled_resumed,
    ("resumed", "cancelled"): resumed_cancelled,
    ("resumed", "memory"): resumed_memory,
    ("resumed", "waiting"): resumed_next,
    ("resumed", "fetch"): resumed_next,
    ("resumed", "executing"): resumed_back,
    ("resumed", "long-running"): resumed_back,
    ("resumed", "flight"): resumed_back,
    ("memory", "released"): memory_released,
    ("memory", "forgotten"): memory_forgotten,
    ("error", "released"): error_released,
    ("error", "waiting"): error_waiting,
    ("error", "fetch"): error_fetch,
}


EDGES: Final[dict[str, dict[str, Transition]]] = {}
"""``TRANSITIONS`` by start, then finish: the lookup builds no ``(start, finish)`` tuple."""
for (_start, _finish), _fn in TRANSITIONS.items():
    EDGES.setdefault(_start, {})[_finish] = _fn


def _edge(ws: WorkerState, ts: WorkerTask, start: str, finish: str) -> Transition:
    edges = EDGES.get(start)
    fn = None if edges is None else edges.get(finish)
    if fn is None:
        raise InvalidTransition(ts.key, start, finish, ws.story(ts.key))
    return fn


def transition(
    ws: WorkerState, ts: WorkerTask, finish: str, stim: str, now: float, out: list[Any]
) -> Recs | None:
    """Move ``ts`` along one edge of ``TRANSITIONS``; any other move is a bug."""
    return _edge(ws, ts, ts.state, finish)(ws, ts, stim, now, out)


def step(
    ws: WorkerState, ts: WorkerTask, finish: str, stim: str, now: float, out: list[Any]
) -> None:
    """``drain(ws, {ts: finish}, ...)`` without building the one-entry dict and queue: the
    same edge, the same skips (already there, forgotten), then the recommendations it
    returns in the same order. Most events recommend one move of one task."""
    start = ts.state
    if start == finish or start == "forgotten":
        return
    more = _edge(ws, ts, start, finish)(ws, ts, stim, now, out)
    if more:
        drain(ws, more, stim, now, out)


def drain(ws: WorkerState, recs: Recs, stim: str, now: float, out: list[Any]) -> None:
    """Apply recommendations (and the ones they produce) until none are left.

    First in, first out, so instructions follow event order: ``order`` holds the tasks in
    the order ``recs`` (the latest recommendation per task) first got them, as a dict's
    insertion order would, but popping the front is O(1) (``next(iter(dict))`` after
    many pops from the front scans the dict's deleted slots). A new recommendation for a
    task already waiting replaces its target and keeps its place, as ``dict.update`` does.
    """
    order = deque(recs)
    pop_first = order.popleft
    while order:
        ts = pop_first()
        finish = recs.pop(ts)
        start = ts.state
        if start == finish or start == "forgotten":
            continue
        more = _edge(ws, ts, start, finish)(ws, ts, stim, now, out)
        if more:
            for t, f in more.items():
                if t not in recs:
                    order.append(t)
                recs[t] = f
