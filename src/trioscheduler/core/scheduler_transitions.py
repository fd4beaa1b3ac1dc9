"""Every state change of a scheduler task lives here (h11's rule), as a table.

``TRANSITIONS[(start, finish)]`` is a function ``(state, task, worker, error) -> None`` that
moves the task, updates the bookkeeping that depends on its state (worker processing
sets, replicas, waiters, clients), appends effects and recommends further transitions
through ``state.recommend``. ``SchedulerState.transition`` looks the edge up; an edge
missing from the table raises ``InvalidTransition`` with the key's story. Every edge
takes the same two named extras and uses at most one: ``worker``, the holder for
``-> memory`` (a worker with room for ``queued -> processing``), and ``error``, the
failure for ``-> erred``.

States and the edges between them::

    released  -> waiting, queued, processing, erred, memory, forgotten
    waiting   -> processing, queued, no-worker, released, erred, memory
    queued    -> processing, waiting, released, erred, memory
    no-worker -> processing, waiting, released, erred, memory
    processing-> memory, erred, waiting, released
    memory    -> released
    erred     -> released, waiting (retry), forgotten

A released task whose inputs are all in memory does not stop in ``waiting``: the
``processing`` recommendation it would make is applied at once (the drain, LIFO, would
apply it next anyway), so one transition takes it to ``processing`` or ``queued``.

Root-ish tasks (no restrictions; no dependencies, or a few of tiny groups, as dask's
``is_rootish``) do not go to a worker at once while queuing is on
(``worker_saturation < inf``): they wait in ``queued``, a heap by priority, and
``SchedulerState._fill_queue_slots`` hands them out as workers get room, so a worker
receives consecutive tasks (siblings) and never more root tasks than it can start soon.
Other tasks are placed at once, where their inputs are.

"Active" states (waiting, queued, no-worker, processing) are those of a task that still needs
its dependencies: it counts in each dependency's ``n_waiters``. Data in memory is released
once no client wants it and no active dependent waits for it; a released task stays
(for its lineage) until it has no dependents, then it is forgotten.
"""

from __future__ import annotations

import heapq
import pickle
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any, Final, Optional, cast

from trioscheduler.core.empty import EMPTY, EMPTY_MAP
from trioscheduler.core.messages import ComputeTask, KeyErred, KeyInMemory, KeyLost, ToWorker
from trioscheduler.core.placement import decide_worker
from trioscheduler.errors import TrioSchedulerError

_FROZEN: Final[type[Any]] = frozenset

if TYPE_CHECKING:
    from trioscheduler.core.scheduler import SchedulerState
    from trioscheduler.core.scheduler_records import (
        ClientRecord,
        ErrorInfo,
        TaskRecord,
        WorkerRecord,
    )

ACTIVE: Final = frozenset({"waiting", "no-worker", "processing", "queued"})

Holder = Optional["WorkerRecord"]
"""What ``-> memory`` needs (the worker holding the data; for ``processing -> memory``
None means the one it ran on) and ``queued -> processing`` (a worker with room)."""
Failure = Optional["ErrorInfo"]
"""What ``-> erred`` needs: the failure (None: a stashed error or an erred input's)."""
Transition = Callable[["SchedulerState", "TaskRecord", Holder, Failure], None]


# --------------------------------------------------------------------------------------
# Bookkeeping shared by the edges (no task state changes here)
# --------------------------------------------------------------------------------------


def added(cur: AbstractSet[Any], item: Any, single: frozenset[Any]) -> AbstractSet[Any]:
    """``cur`` with ``item``, copy on write: a lone item is the shared ``single``.

    Most tasks are wanted by one client and held by one worker; sharing that
    client's/worker's one-element frozenset saves a 216-byte set per task. So the
    value is a frozenset (shared: never mutated) or a set of this task's own.
    """
    if not cur:
        return single
    if item in cur:
        return cur
    if type(cur) is _FROZEN:
        return {*cur, item}
    cast("set[Any]", cur).add(item)
    return cur


def discarded(cur: AbstractSet[Any], item: Any) -> AbstractSet[Any]:
    """``cur`` without ``item`` (copy on write, see ``added``)."""
    if item not in cur:
        return cur
    if len(cur) == 1:
        return EMPTY
    if type(cur) is _FROZEN:
        return set(cur) - {item}
    cast("set[Any]", cur).discard(item)
    return cur


def add_dependent(ts: TaskRecord, key: Any) -> None:
    """A lone dependent is a 1-tuple (most tasks of a tree or chain have exactly one):
    56 bytes instead of a 184-byte dict; the second one makes it a dict."""
    d = ts.dependents
    if not d:
        ts.dependents = (key,)
    elif type(d) is tuple:
        if d[0] != key:
            ts.dependents = {d[0]: None, key: None}
    else:
        cast("dict[Any, None]", d)[key] = None


def remove_dependent(ts: TaskRecord, key: Any) -> None:
    d = ts.dependents
    if type(d) is tuple:
        if d and d[0] == key:
            ts.dependents = EMPTY_MAP
    elif key in d:
        del cast("dict[Any, None]", d)[key]


def want(ts: TaskRecord, cs: ClientRecord) -> None:
    ts.wanted_by = added(ts.wanted_by, cs.client, cs.single)


def unwant(ts: TaskRecord, client: str) -> None:
    ts.wanted_by = discarded(ts.wanted_by, client)


def add_replica(s: SchedulerState, ts: TaskRecord, ws: WorkerRecord) -> None:
    who_has = ts.who_has = added(ts.who_has, ws.address, ws.single)
    if len(who_has) > 1:
        s.replicated[ts.key] = None
    ws.has_what[ts.key] = None
    ws.nbytes += ts.nbytes


def remove_replica(s: SchedulerState, ts: TaskRecord, ws: WorkerRecord) -> None:
    who_has = ts.who_has = discarded(ts.who_has, ws.address)
    if len(who_has) < 2:
        s.replicated.pop(ts.key, None)
    if ts.key in ws.has_what:
        del ws.has_what[ts.key]
        ws.nbytes -= ts.nbytes


def _assign(s: SchedulerState, ts: TaskRecord, ws: WorkerRecord) -> None:
    """Put ``ts`` on ``ws`` and send it there."""
    key = ts.key
    avg = ts.prefix.duration_average
    d = avg if avg >= 0.0 else s.default_duration
    addr = ws.address
    ts.state = "processing"
    ts.processing_on = addr
    ws.processing[key] = d
    ws.occupancy += d
    s.update_worker_sets(ws)
    who_has: dict[Any, Sequence[str]] = {}
    nbytes: dict[Any, int] = {}
    deps = ts.dependencies
    if deps:
        tasks = s.tasks
        for dk in deps:
            dts = tasks[dk]
            wh = dts.who_has
            who_has[dk] = list(wh) if len(wh) < 2 else sorted(wh)
            nbytes[dk] = dts.nbytes
    open_free = s._open_free
    if open_free:
        open_free.pop(addr, None)  # a later FreeKeys must not jump ahead of this task
    s._run_seq += 1
    run_id = s._run_seq
    s.runs[key] = run_id
    s._effects.append(
        ToWorker(
            addr,
            ComputeTask(
                s.stimulus_id, s.now, key, ts.run_spec, list(deps), who_has, nbytes,
                ts.priority, None if ts.extra is None else ts.extra.resource_restrictions, d,
                run_id,
            ),
        )
    )  # fmt: skip


def rootish(s: SchedulerState, ts: TaskRecord) -> bool:
    """A task placement cannot improve (dask's ``is_rootish``): unrestricted, and without
    inputs, or one of a large group (more tasks than twice the threads) whose inputs are
    a few tasks of tiny groups, which end up replicated wherever the group runs. A lone
    task reading big data is not: it should run where the data is."""
    ex = ts.extra
    if ex is not None and (
        ex.worker_restrictions is not None or ex.resource_restrictions is not None
    ):
        return False
    deps = ts.dependencies
    if not deps:
        return True
    if len(deps) > TINY_GROUP or ts.prefix.n_tasks <= 2 * s.total_nthreads:
        return False
    tasks = s.tasks
    for dk in deps:
        if tasks[dk].prefix.n_tasks > TINY_GROUP:
            return False
    return True


TINY_GROUP: Final = 4  # dask: dependency groups of fewer than 5 tasks in all


def _enqueue(s: SchedulerState, ts: TaskRecord) -> None:
    s._queue_seq += 1
    seq = s._queue_seq
    s.queued[ts.key] = seq
    heapq.heappush(s._queue_heap, (ts.priority, seq, ts.key))
    ts.state = "queued"


def _unqueue(s: SchedulerState, ts: TaskRecord) -> None:
    """Leave the queue; its heap entry goes stale (compacted when most entries are)."""
    queued = s.queued
    del queued[ts.key]
    heap = s._queue_heap
    if len(heap) > 2 * len(queued) + 1024:
        heap[:] = [e for e in heap if queued.get(e[2]) == e[1]]
        heapq.heapify(heap)


def _unassign(s: SchedulerState, ts: TaskRecord, free: bool) -> None:
    """Take ``ts`` off its worker (telling the worker to drop it if ``free``)."""
    addr = ts.processing_on
    ts.processing_on = None
    if addr is None:
        return
    s.runs.pop(ts.key, None)
    steal = s.steals.pop(ts.key, None)
    if steal is not None:
        thief = s.workers.get(steal.thief)
        if thief is not None:
            thief.incoming_steals -= 1
            s.update_worker_sets(thief)
    ws = s.workers.get(addr)
    if ws is None:
        return
    d = ws.processing.pop(ts.key, 0.0)
    ws.long_running.discard(ts.key)
    ws.occupancy = ws.occupancy - d if ws.processing else 0.0
    s.update_worker_sets(ws)
    if free:
        s.free_on(addr, ts.key)


def _activate(s: SchedulerState, ts: TaskRecord) -> None:
    tasks = s.tasks
    for dk in ts.dependencies:
        tasks[dk].n_waiters += 1


def _deactivate(s: SchedulerState, ts: TaskRecord) -> None:
    """``ts`` no longer needs its dependencies: release those nobody else needs."""
    tasks = s.tasks
    for dk in ts.dependencies:
        dts = tasks[dk]
        dts.n_waiters -= 1
        if not dts.n_waiters and not dts.wanted_by and dts.state != "released":
            s.maybe_release(dts)
    ts.n_waiting = 0


def _enter_waiting(s: SchedulerState, ts: TaskRecord) -> None:
    """Wait for dependencies not in memory (recomputing released ones), or run."""
    tasks = s.tasks
    recs = s.recs
    n = 0
    for dk in ts.dependencies:
        dts = tasks[dk]
        st = dts.state
        if st != "memory":
            n += 1
            if st == "released":
                recs[dk] = "waiting"
    ts.n_waiting = n
    ts.state = "waiting"
    if not n:
        recs[ts.key] = "processing"


def _release(s: SchedulerState, ts: TaskRecord, was_active: bool) -> None:
    if was_active:
        _deactivate(s, ts)
    ts.state = "released"
    if ts.wanted_by or ts.n_waiters:
        s.recommend(ts.key, "waiting")
    elif not ts.dependents:
        s.recommend(ts.key, "forgotten")


def _clear_error(ts: TaskRecord) -> None:
    ts.exception = ts.traceback = None
    ts.exception_text = ts.traceback_text = ""
    ts.exception_blame = None


def _to_memory(s: SchedulerState, ts: TaskRecord, holder: Holder, was_active: bool) -> None:
    assert holder is not None, "-> memory needs the worker holding the data"
    key = ts.key
    if was_active:
        _deactivate(s, ts)
    ts.state = "memory"
    add_replica(s, ts, holder)
    tasks = s.tasks
    recs = s.recs
    for dk in ts.dependents:
        dts = tasks[dk]
        if dts.state == "waiting":
            dts.n_waiting -= 1
            if not dts.n_waiting:
                recs[dk] = "processing"
    wanted_by = ts.wanted_by
    if wanted_by:
        for c in wanted_by if len(wanted_by) < 2 else sorted(wanted_by):
            s.to_client(c, KeyInMemory(key, ts.type_name))
    elif not ts.n_waiters:
        recs[key] = "released"


def _to_erred(s: SchedulerState, ts: TaskRecord, error: Failure, was_active: bool) -> None:
    """Record the failure (``error``, a stashed error, or an erred dependency's) and
    propagate it to dependents that still wanted to run."""
    if error is not None:
        ts.exception = error.exception
        ts.traceback = error.traceback
        ts.exception_text = error.exception_text
        ts.traceback_text = error.traceback_text
        ts.exception_blame = error.blame
    elif ts.exception is None:
        tasks = s.tasks
        for dk in ts.dependencies:
            dts = tasks[dk]
            if dts.state == "erred":
                ts.exception = dts.exception
                ts.traceback = dts.traceback
                ts.exception_text = dts.exception_text
                ts.traceback_text = dts.traceback_text
                ts.exception_blame = dts.exception_blame
                break
        else:
            ts.exception = ts.traceback = b""
            ts.exception_text = "erred without a known cause"
            ts.exception_blame = ts.key
    if was_active:
        _deactivate(s, ts)
    ts.state = "erred"
    tasks = s.tasks
    recs = s.recs
    for dk in ts.dependents:
        dts = tasks[dk]
        if dts.state in ACTIVE or (dts.state == "released" and (dts.wanted_by or dts.n_waiters)):
            recs[dk] = "erred"
    if ts.wanted_by:
        msg = KeyErred(ts.key, ts.exception or b"", ts.traceback or b"", ts.exception_text)
        for c in sorted(ts.wanted_by):
            s.to_client(c, msg)
    elif not ts.dependents:
        recs[ts.key] = "forgotten"


def move_processing(s: SchedulerState, ts: TaskRecord, thief: WorkerRecord) -> None:
    """A confirmed steal: same state, new worker (the victim already dropped it)."""
    victim = ts.processing_on
    _unassign(s, ts, free=False)
    _assign(s, ts, thief)
    s.log.record(ts.key, "processing", "processing", s.stimulus_id, s.now)
    s.log_msg("debug", f"stole {ts.key!r} from {victim} to {thief.address}")


# --------------------------------------------------------------------------------------
# The edges
# --------------------------------------------------------------------------------------


def released_waiting(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    if not ts.wanted_by and not ts.n_waiters:
        # stale: the dependent that wanted it was released before this ran
        if not ts.dependents:
            s.recommend(ts.key, "forgotten")
        return
    tasks = s.tasks
    for dk in ts.dependencies:
        if tasks[dk].state == "erred":
            s.recommend(ts.key, "erred")
            return
    if ts.run_spec is None:
        _stash_lost(ts)
        s.recommend(ts.key, "erred")
        return
    _activate(s, ts)
    _enter_waiting(s, ts)


def released_onwards(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    """``released -> waiting``, then at once ``-> processing | queued`` when every input
    is in memory (one transition; the story says ``released -> processing | queued``).

    Only reached through ``drain``: the ``processing`` recommendation just made is the
    last one in ``_recs``, so it would have been the very next applied (LIFO).
    """
    released_waiting(s, ts, worker, error)
    if ts.state == "waiting" and not ts.n_waiting:
        recs = s.recs
        if recs.get(ts.key) == "processing":
            del recs[ts.key]
            waiting_processing(s, ts, None, None)


def stash_error(ts: TaskRecord, exc: Exception) -> None:
    """The scheduler's own verdict on ``ts`` (no worker traceback), for ``erred``."""
    ts.exception = pickle.dumps(exc)
    ts.traceback = b""
    ts.exception_text = str(exc)
    ts.exception_blame = ts.key


def _stash_lost(ts: TaskRecord) -> None:
    stash_error(
        ts,
        TrioSchedulerError(
            f"the data of {ts.key!r} was lost and it has no lineage to recompute it from "
            "(it was scattered, not computed). Scatter it again."
        ),
    )


def released_erred(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    _to_erred(s, ts, error, was_active=False)


def released_memory(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    _to_memory(s, ts, worker, was_active=False)


def released_forgotten(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    if ts.wanted_by or ts.dependents:
        return  # stale recommendation: somebody wants it again
    key = ts.key
    ts.state = "forgotten"
    ts.prefix.n_tasks -= 1
    tasks = s.tasks
    recs = s.recs
    del tasks[key]
    for dk in ts.dependencies:
        dts = tasks[dk]
        remove_dependent(dts, key)
        if not dts.dependents and not dts.wanted_by:
            if dts.state in ("released", "erred"):
                recs[dk] = "forgotten"
            elif not dts.n_waiters:
                s.maybe_release(dts)


def waiting_processing(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    if ts.n_waiting:
        return  # a stale recommendation: a dependency went missing meanwhile
    if s.queuing and rootish(s, ts):
        _enqueue(s, ts)  # the story says waiting -> queued; handed out after the event
        return
    ws = decide_worker(s, ts)
    if ws is None:
        s.recommend(ts.key, "no-worker")
        return
    _assign(s, ts, ws)


def waiting_queued(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    if ts.n_waiting:
        return  # stale, as in waiting_processing
    _enqueue(s, ts)


def queued_processing(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    """``worker``: one with room (``SchedulerState.open``); the first one if None."""
    ws = worker
    if ws is None:
        if not s.open:
            return  # no room yet: stay queued
        ws = next(iter(s.open.values()))
    _unqueue(s, ts)
    _assign(s, ts, ws)


def queued_waiting(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    """An input was lost: wait for its recomputation."""
    _unqueue(s, ts)
    _enter_waiting(s, ts)


def queued_released(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    _unqueue(s, ts)
    _release(s, ts, was_active=True)


def queued_erred(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    _unqueue(s, ts)
    _to_erred(s, ts, error, was_active=True)


def queued_memory(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    _unqueue(s, ts)
    _to_memory(s, ts, worker, was_active=True)


def waiting_no_worker(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    ts.state = "no-worker"
    s.unrunnable[ts.key] = s.now


def waiting_released(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    _release(s, ts, was_active=True)


def waiting_erred(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    _to_erred(s, ts, error, was_active=True)


def waiting_memory(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    _to_memory(s, ts, worker, was_active=True)


def no_worker_processing(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    ws = decide_worker(s, ts)
    if ws is None:
        return  # still no valid worker: stay
    s.unrunnable.pop(ts.key, None)
    _assign(s, ts, ws)


def no_worker_waiting(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    s.unrunnable.pop(ts.key, None)
    _enter_waiting(s, ts)


def no_worker_released(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    s.unrunnable.pop(ts.key, None)
    _release(s, ts, was_active=True)


def no_worker_erred(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    s.unrunnable.pop(ts.key, None)
    _to_erred(s, ts, error, was_active=True)


def no_worker_memory(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    s.unrunnable.pop(ts.key, None)
    _to_memory(s, ts, worker, was_active=True)


def processing_memory(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    """``worker``: the holder; None means the worker it was processing on."""
    on = ts.processing_on
    if worker is None:
        assert on is not None
        worker = s.workers[on]
    _unassign(s, ts, free=worker.address != on)
    _to_memory(s, ts, worker, was_active=True)


def processing_erred(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    _unassign(s, ts, free=True)
    _to_erred(s, ts, error, was_active=True)


def processing_waiting(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    _unassign(s, ts, free=True)
    _enter_waiting(s, ts)


def processing_released(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    _unassign(s, ts, free=True)
    _release(s, ts, was_active=True)


def memory_released(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    """Drop every replica; dependents that counted on the data wait again.

    With clients or waiters still needing it, this is a loss: recompute from lineage.
    """
    key = ts.key
    workers = s.workers
    who_has = ts.who_has
    for addr in who_has if len(who_has) < 2 else sorted(who_has):
        ws = workers[addr]
        ws.has_what.pop(key, None)
        ws.nbytes -= ts.nbytes
        s.free_on(addr, key)
    if len(who_has) > 1:
        s.replicated.pop(key, None)
    ts.who_has = EMPTY
    ts.state = "released"
    tasks = s.tasks
    recs = s.recs
    for dk in ts.dependents:
        dts = tasks[dk]
        st = dts.state
        if st == "waiting":
            dts.n_waiting += 1
        elif st in ("processing", "no-worker", "queued"):
            recs[dk] = "waiting"
    if ts.wanted_by:
        for c in sorted(ts.wanted_by):
            s.to_client(c, KeyLost(key))
        recs[key] = "waiting"
    elif ts.n_waiters:
        recs[key] = "waiting"
    elif not ts.dependents:
        recs[key] = "forgotten"


def erred_released(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    _clear_error(ts)
    ts.state = "released"
    if ts.wanted_by or ts.n_waiters:
        s.recommend(ts.key, "waiting")
    elif not ts.dependents:
        s.recommend(ts.key, "forgotten")


def erred_waiting(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    """Retry: compute again, and so do the dependents that erred because of it.

    Whether anyone still needs it is only known once those dependents have moved, so
    it is checked again after the drain (``SchedulerState.retried``).
    """
    _clear_error(ts)
    ts.state = "released"
    tasks = s.tasks
    for dk in ts.dependents:
        if tasks[dk].state == "erred":
            s.recommend(dk, "waiting")
    s.retried.append(ts)
    released_waiting(s, ts, worker, error)


def erred_forgotten(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:
    if ts.wanted_by or ts.dependents:
        return  # stale recommendation: somebody wants it again
    _clear_error(ts)
    released_forgotten(s, ts, worker, error)


TRANSITIONS: Final[dict[tuple[str, str], Transition]] = {
    ("released", "waiting"): released_onwards,
    ("released", "queued"): released_onwards,
    ("released", "processing"): released_onwards,
    ("released", "erred"): released_erred,
    ("released", "memory"): released_memory,
    ("released", "forgotten"): released_forgotten,
    ("waiting", "processing"): waiting_processing,
    ("waiting", "queued"): waiting_queued,
    ("waiting", "no-worker"): waiting_no_worker,
    ("waiting", "released"): waiting_released,
    ("waiting", "erred"): waiting_erred,
    ("waiting", "memory"): waiting_memory,
    ("queued", "processing"): queued_processing,
    ("queued", "waiting"): queued_waiting,
    ("queued", "released"): queued_released,
    ("queued", "erred"): queued_erred,
    ("queued", "memory"): queued_memory,
    ("no-worker", "processing"): no_worker_processing,
    ("no-worker", "waiting"): no_worker_waiting,
    ("no-worker", "released"): no_worker_released,
    ("no-worker", "erred"): no_worker_erred,
    ("no-worker", "memory"): no_worker_memory,
    ("processing", "memory"): processing_memory,
    ("processing", "erred"): processing_erred,
    ("processing", "waiting"): processing_waiting,
    ("processing", "released"): processing_released,
    ("memory", "released"): memory_released,
    ("erred", "released"): erred_released,
    ("erred", "waiting"): erred_waiting,
    ("erred", "forgotten"): erred_forgotten,
}

EDGES: Final[dict[str, dict[str, Transition]]] = {}
"""``TRANSITIONS`` by start, then finish: the lookup builds no ``(start, finish)`` tuple."""
for (_start, _finish), _fn in TRANSITIONS.items():
    EDGES.setdefault(_start, {})[_finish] = _fn
