"""The worker's sans-io core: events in, instructions out.

``WorkerState.handle(*events)`` is the only way to change a worker's state. Handlers turn
an event into recommendations (``{task: finish}``) which ``worker_transitions.drain``
applies; then three decisions run, all pure: report acquired replicas, spill to the
memory target, start tasks in priority order (thread slots, resources, not while
paused; with ``prefetch``, short tasks also queued behind the running ones) and start
transfers (one ``GatherDep`` per peer at a time, at most
``transfer_incoming_count_limit`` in all and, if set, ``transfer_incoming_bytes_limit``
bytes in flight, keys bundled per peer up to ``transfer_message_bytes_limit``); the last
two live in ``worker_decisions``.

Where values live is tracked here, not in the shell: ``in_memory`` (RAM) and
``spilled`` (disk) partition the keys in state ``memory``. The core *decides* ``Spill``
and ``Unspill`` and books them at once; the shell obeys in order and reports
``SpillFailed`` if a value cannot be pickled, which moves it back for good. A spilled
key stays in ``writing`` (its bytes in ``writing_bytes``) until the shell reports its file
complete (``SpillWritten``), or until it leaves ``spilled`` (unspilled, dropped, given a
new value, failed): that write is then over for the core, whatever the shell does with
it. No task starts while ``writing_bytes`` exceeds the write-ahead threshold (not
counting the writes of its own inputs, which its start ends), so the bytes counted as on
disk are never far ahead of what has really left RAM.

Queues are heaps with lazy deletion: an entry is valid while its task is still in the
state it was queued for, so leaving a queue costs nothing. Ties break on a per-task
serial number, so the instruction lists are deterministic for the recorder.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, cast

from trioscheduler.core import memory_policy as mp
from trioscheduler.core.errors import InvalidTransition
from trioscheduler.core.messages import (
    HEARTBEAT_TIMEOUT,
    AcquireReplicas,
    AddKeys,
    CloseWorker,
    ComputeTask,
    DeleteData,
    ExecuteFailure,
    ExecuteSuccess,
    FreeKeys,
    GatherDepFailure,
    GatherDepSuccess,
    Key,
    LongRunning,
    MemoryMeasured,
    RefreshWhoHas,
    ReleaseWorkerData,
    Reschedule,
    RescheduleEvent,
    SchedulerLost,
    SecedeEvent,
    Spill,
    SpillFailed,
    SpillWritten,
    StealRequest,
    StealResponse,
    TaskErred,
    TaskFinished,
    ToScheduler,
    Unspill,
    WorkerStatusChange,
    WorkerUpdateData,
)
from trioscheduler.core.story import StoryLog
from trioscheduler.core.worker_decisions import ensure_communicating, ensure_computing
from trioscheduler.core.worker_invariants import validate_worker
from trioscheduler.core.worker_task import HeapEntry, WorkerTask
from trioscheduler.core.worker_transitions import (
    DATA_STATES,
    RUNNING_STATES,
    Recs,
    drain,
    secede_cancelled,
    step,
)

STEALABLE: Final = frozenset({"waiting", "ready", "constrained"})
"""States in which a stolen task had not started and is released here."""

PREFETCH_DURATION: Final = 0.001
"""Seconds of estimated work per thread (``ComputeTask.duration``, the scheduler's
estimate) that prefetching may hand to the threads at once, running tasks included."""


class WorkerState:
    """Everything one worker knows, changed only by ``handle``."""

    __slots__ = (
        "address", "nthreads", "total_resources", "available_resources", "thresholds",
        "transfer_incoming_count_limit", "transfer_message_bytes_limit", "validate",
        "transfer_incoming_bytes_limit", "transfer_incoming_bytes", "in_flight_bytes",
        "tasks", "status", "in_memory", "spilled", "memory_bytes", "spilled_bytes",
        "managed_bytes", "writing", "writing_bytes", "executing", "long_running", "missing", "in_flight",
        "_ready", "_ready_consumers", "_constrained", "_fetch_by_peer", "_fetch_dirty", "_lru", "_added", "_dropped",
        "_story", "_story_append", "_serial", "_starts", "process_memory", "_spill_goal",
        "prefetch", "prefetch_duration", "max_executing", "scatter_seq", "_scattered",
    )  # fmt: skip

    def __init__(
        self,
        address: str,
        *,
        nthreads: int = 1,
        resources: dict[str, float] | None = None,
        memory_limit: int = 0,
        target: float | None = 0.6,
        spill: float | None = 0.7,
        pause: float | None = 0.8,
        write_ahead: float | None = 0.1,
        transfer_incoming_count_limit: int = 4,
        transfer_message_bytes_limit: int = 50_000_000,
        validate: bool = False,
        story_limit: int = 100_000,
        transfer_incoming_bytes_limit: int | None = None,
        prefetch: int = 0,
        prefetch_duration: float = PREFETCH_DURATION,
    ) -> None:
        """``transfer_incoming_bytes_limit`` (dask's, 10% of the memory limit in its
        ``Worker``; None: no limit): no transfer starts while this many bytes are in
        flight, nor one that would pass it, except a single key when nothing else is in
        flight (so a key larger than the limit still arrives)."""
        self.address = address
        self.nthreads = nthreads
        # up to ``prefetch`` short tasks started beyond the thread slots, each to run on
        # the next thread that frees (``Execute.behind``; see ``worker_decisions``)
        self.prefetch = max(0, prefetch)
        self.prefetch_duration = prefetch_duration
        self.max_executing = nthreads + self.prefetch
        self.total_resources: dict[str, float] = dict(resources or {})
        self.available_resources: dict[str, float] = dict(self.total_resources)
        self.thresholds = mp.MemoryThresholds.from_fractions(
            memory_limit, target, spill, pause, write_ahead
        )
        self._spill_goal = mp.spill_goal(self.thresholds)  # managed bytes spilling aims at
        self.transfer_incoming_count_limit = transfer_incoming_count_limit
        self.transfer_message_bytes_limit = transfer_message_bytes_limit
        self.transfer_incoming_bytes_limit = transfer_incoming_bytes_limit
        self.transfer_incoming_bytes = 0  # sum of ``in_flight_bytes``
        self.in_flight_bytes: dict[str, int] = {}  # peer -> bytes its GatherDep asked for
        self.validate = validate
        self.tasks: dict[Key, WorkerTask] = {}
        self.status = "running"
        self.in_memory: set[Key] = set()
        self.spilled: set[Key] = set()
        self.memory_bytes = 0
        self.spilled_bytes = 0
        self.managed_bytes = 0
        # spilled keys whose file the shell has not reported written: key -> nbytes
        self.writing: dict[Key, int] = {}
        self.writing_bytes = 0
        self.process_memory = 0
        self.executing: set[WorkerTask] = set()  # tasks holding a thread slot
        self.long_running: set[WorkerTask] = set()  # seceded: thread runs, slot free
        self.missing: set[WorkerTask] = set()
        self.in_flight: dict[str, set[WorkerTask]] = {}  # peer -> keys of its one GatherDep
        self._ready: list[HeapEntry] = []
        # the ready tasks that read inputs (also in ``_ready``): preferred while the worker
        # holds more than its memory target, so data is consumed before more is produced
        self._ready_consumers: list[HeapEntry] = []
        self._constrained: list[HeapEntry] = []
        self._fetch_by_peer: dict[str, list[HeapEntry]] = {}
        self._fetch_dirty = False
        self._lru: dict[Key, int] = {}  # spillable keys in RAM, least recently used first
        self._added: dict[Key, int] = {}  # replicas acquired during this event
        self.scatter_seq = 0  # data updates (scatters) taken so far; the shell answers it
        self._scattered: dict[Key, int] = {}  # key -> the data update that put it here
        self._dropped: dict[Key, None] = {}  # values dropped during this event
        # transitions as parallel columns: nothing allocated per transition (see StoryLog)
        self._story = StoryLog(story_limit)
        self._story_append = self._story.appenders()
        self._serial = 0
        self._starts = 0  # Execute/GatherDep emitted by the current event (validation)

    # ------------------------------------------------------------------ public API

    @property
    def executing_count(self) -> int:
        return len(self.executing)

    @property
    def memory_limit(self) -> int:
        return self.thresholds.limit

    def story(self, key: Key) -> list[tuple[Any, ...]]:
        """``(key, start, finish, stimulus_id, now)`` of every recorded transition of ``key``."""
        return self._story.story(key)

    def log_tap(self, on: bool) -> tuple[list[Any], ...] | None:
        """As ``SchedulerState.log_tap``: copy transitions into lists the shell empties."""
        if not on:
            self._story_append = self._story.appenders()
            return None
        self._story_append, tap = self._story.tapped_appenders()
        return tap

    def handle(self, *events: Any) -> list[Any]:
        """Apply events in order; return the instructions for the shell.

        The decisions (report replicas, spill, start tasks and transfers) run once after
        the whole batch, as of its last event: a batch of finished tasks or arrived
        transfers costs one ``AddKeys`` and one pass over the queues, not one per event.
        """
        out: list[Any] = []
        handlers = _HANDLERS
        validate = self.validate
        ev: Any = None
        for ev in events:
            handler = handlers.get(type(ev))
            if handler is None:
                raise TypeError(f"WorkerState cannot handle {type(ev).__name__}: {ev!r:.200}")
            handler(self, ev, out)
            if validate:
                self._starts = 0
                validate_worker(self)
        if ev is None:
            return out
        self._starts = 0
        stim: str = ev.stimulus_id
        now: float = ev.now
        added = self._added
        if added:
            self._added = {}
            tasks = self.tasks
            for key in [k for k in added if (t := tasks.get(k)) is None or t.state != "memory"]:
                del added[key]  # dropped again within the batch: nothing to report
            if added:
                out.append(ToScheduler(AddKeys(stim, now, self.address, added)))
        dropped = self._dropped
        if dropped:
            # Reported, as dask's workers do: the scheduler may have counted this copy
            # after sending the FreeKeys that dropped it (a TaskFinished that crossed
            # it), and must not send fetchers here.
            self._dropped = {}
            tasks = self.tasks
            gone = [k for k in dropped if (t := tasks.get(k)) is None or t.state != "memory"]
            if gone:  # lazy: goes with the next message (a FreeKeys' batch often starts a
                # task whose TaskFinished follows soon), not in a write of its own
                msg = ReleaseWorkerData(stim, now, self.address, gone, self.scatter_seq)
                out.append(ToScheduler(msg, lazy=True))
        goal = self._spill_goal
        if goal is not None and self.memory_bytes > goal:
            self._spill_to_target(out, ())
        if (self._ready or self._constrained) and len(self.executing) < self.max_executing:
            ensure_computing(self, stim, now, out)
        if self._fetch_dirty:
            ensure_communicating(self, stim, now, out)
        if validate:
            validate_worker(self)
        return out

    # ------------------------------------------------------------------ helpers

    def _task(self, key: Key) -> WorkerTask:
        ts = self.tasks.get(key)
        if ts is None:
            self._serial += 1
            ts = self.tasks[key] = WorkerTask(key, self._serial)
        return ts

    def _drain(self, recs: Recs, ev: Any, out: list[Any]) -> None:
        if recs:
            drain(self, recs, ev.stimulus_id, ev.now, out)

    def _step(self, ts: WorkerTask, finish: str, ev: Any, out: list[Any]) -> None:
        step(self, ts, finish, ev.stimulus_id, ev.now, out)

    def _push_ready(self, ts: WorkerTask, heap: list[HeapEntry]) -> None:
        entry = (ts.priority, ts.serial, ts)
        heapq.heappush(heap, entry)
        if ts.dependencies and heap is self._ready and self.thresholds.target is not None:
            # (read only above the memory target: not kept without one)
            consumers = self._ready_consumers
            if len(consumers) > 2 * len(heap) + 64:  # mostly stale: started via ``_ready``
                consumers[:] = [e for e in consumers if e[2].state == "ready"]
                heapq.heapify(consumers)
            heapq.heappush(consumers, entry)

    def _push_fetch(self, ts: WorkerTask) -> None:
        entry = (ts.priority, ts.serial, ts)
        by_peer = self._fetch_by_peer
        for peer in ts.who_has:
            heap = by_peer.get(peer)
            if heap is None:
                by_peer[peer] = [entry]
            else:
                heapq.heappush(heap, entry)
        self._fetch_dirty = True

    def _set_who_has(self, ts: WorkerTask, holders: Iterable[str]) -> None:
        """Replace ``ts``'s holders; a queued fetch is queued for the new ones too.

        The caller handles a fetch left with no holder (it becomes ``missing``).
        """
        me = self.address
        new = {w for w in holders if w != me}
        if ts.state == "fetch" and new - ts.who_has:
            ts.who_has = new
            self._push_fetch(ts)
        else:
            ts.who_has = new

    def _learn_holders(self, ts: WorkerTask, holders: Sequence[str] | None) -> None:
        """Holders named by a ``ComputeTask`` or ``AcquireReplicas``. A fetch keeps its
        own when the list names no other worker (empty, or only this one: a count gone
        stale, as when this worker's copy was dropped by a ``FreeKeys`` that crossed its
        ``AddKeys``); only ``RefreshWhoHas``, the answer to ``MissingData``, empties one."""
        if holders is None:
            return
        if ts.state == "fetch" and all(w == self.address for w in holders):
            return
        self._set_who_has(ts, holders)

    # ------------------------------------------------------------------ memory bookkeeping

    def _store(self, ts: WorkerTask) -> None:
        """``ts``'s value is now in RAM (stored by the shell); it is the most recent."""
        n = ts.nbytes
        self.in_memory.add(ts.key)
        self.memory_bytes += n
        self.managed_bytes += n
        if ts.spillable:
            self._lru[ts.key] = n

    def _drop(self, ts: WorkerTask, out: list[Any]) -> None:
        """Forget ``ts``'s value, wherever it lives."""
        key = ts.key
        n = ts.nbytes
        if key in self.spilled:
            self.spilled.remove(key)
            self.spilled_bytes -= n
            self._end_write(key)
        else:
            self.in_memory.remove(key)
            self.memory_bytes -= n
            self._lru.pop(key, None)
        self.managed_bytes -= n
        self._dropped[key] = None
        out.append(DeleteData(key))

    def _resize(self, ts: WorkerTask, nbytes: int) -> None:
        """A held value was replaced (scatter again): rebook its size."""
        diff = nbytes - ts.nbytes
        ts.nbytes = nbytes
        self.managed_bytes += diff
        if ts.key in self.spilled:
            self._end_write(ts.key)
            self.spilled_bytes += diff
            self.spilled.remove(ts.key)
            self.memory_bytes += nbytes
            self.spilled_bytes -= nbytes
            self.in_memory.add(ts.key)  # the shell stored the new value in RAM
        else:
            self.memory_bytes += diff
        if ts.spillable:
            self._lru.pop(ts.key, None)
            self._lru[ts.key] = nbytes

    def _touch(self, ts: WorkerTask) -> None:
        lru = self._lru
        n = lru.pop(ts.key, None)
        if n is not None:
            lru[ts.key] = n

    def _spill(self, key: Key, out: list[Any]) -> None:
        n = self._lru.pop(key)
        self.in_memory.remove(key)
        self.spilled.add(key)
        self.memory_bytes -= n
        self.spilled_bytes += n
        self.writing[key] = n
        self.writing_bytes += n
        out.append(Spill(key))

    def _end_write(self, key: Key) -> None:
        """``key``'s pending write is over for the core (written, or no longer wanted)."""
        n = self.writing.pop(key, None)
        if n is not None:
            self.writing_bytes -= n

    def _unspill(self, ts: WorkerTask, out: list[Any]) -> None:
        key = ts.key
        n = ts.nbytes
        self._end_write(key)  # a value still being written comes back; its write is dropped
        self.spilled.remove(key)
        self.in_memory.add(key)
        self.spilled_bytes -= n
        self.memory_bytes += n
        if ts.spillable:
            self._lru[key] = n
        out.append(Unspill(key))

    def _spill_to_target(self, out: list[Any], exclude: Any) -> None:
        excess = mp.target_excess(self.memory_bytes, self.thresholds)
        for key in mp.choose_spill(iter(self._lru.items()), excess, exclude):
            self._spill(key, out)

    # ------------------------------------------------------------------ event handlers

    def _set_compute(self, ts: WorkerTask, ev: ComputeTask) -> bool:
        """Record what to run and which inputs (with their holders and sizes).

        Returns whether every input is in memory here already.
        """
        ts.run_spec = ev.run_spec
        ts.priority = tuple(ev.priority)
        ts.resources = ev.resources or None
        ts.duration = ev.duration
        deps: list[WorkerTask] = []
        here = True
        for k in dict.fromkeys(ev.dependencies):
            if k == ev.key:
                continue
            dep = self._task(k)
            if dep.state != "memory":
                here = False
                self._learn_holders(dep, ev.who_has.get(k))
                n = ev.nbytes.get(k)
                if n is not None:
                    dep.nbytes = n
            deps.append(dep)
        ts.dependencies = tuple(deps)
        return here

    def _on_compute_task(self, ev: ComputeTask, out: list[Any]) -> None:
        ts = self._task(ev.key)
        ts.wanted = True
        ts.run_id = ev.run_id  # whatever runs now answers this assignment
        st = ts.state
        finish: str | None = None
        if st in ("released", "fetch", "missing", "error"):
            finish = "waiting"
        elif st == "flight":
            finish = "resumed"
        elif st == "cancelled":
            assert ts.previous is not None
            finish = ts.previous if ts.previous in RUNNING_STATES else "resumed"
        elif st == "resumed" and ts.next == "fetch":
            assert ts.previous is not None
            self._step(ts, ts.previous, ev, out)
        elif st == "memory":
            out.append(
                ToScheduler(
                    TaskFinished(
                        ev.stimulus_id, ev.now, self.address, ts.key, ts.nbytes,
                        run_id=ev.run_id,
                    )
                )  # fmt: skip
            )
        # waiting / ready / constrained / executing / long-running: already on it
        if finish == "resumed":
            ts.pending_compute = ev  # inputs are looked at only if the transfer fails
        elif finish == "waiting":
            if self._set_compute(ts, ev) and st == "released":
                finish = "constrained" if ts.resources else "ready"  # no waiting step
        if finish is not None:
            self._step(ts, finish, ev, out)

    def _on_free_keys(self, ev: FreeKeys, out: list[Any]) -> None:
        recs: Recs = {}
        tasks = self.tasks
        scattered = self._scattered
        for key in ev.keys:
            ts = tasks.get(key)
            if scattered:
                seq = scattered.pop(key, None)
                if (
                    seq is not None
                    and ts is not None
                    and ts.state == "memory"
                    and ev.seqs is not None  # (None: a scheduler that numbers no scatter)
                    and ev.seqs.get(key, 0) < seq
                ):
                    # sent before the scheduler heard of the scatter that put this value
                    # here (the key released and scattered again): not this free's to drop
                    scattered[key] = seq
                    continue
            if ts is None:
                continue
            ts.wanted = False
            st = ts.state
            if ts.dependents:
                if st == "resumed" and ts.next == "waiting":
                    recs[ts] = "flight"  # compute it no more, but local tasks need the copy
                    continue
                if st in DATA_STATES or (st == "resumed" and ts.next == "fetch"):
                    continue  # kept for local dependents; released when the last one is done
            if st in RUNNING_STATES or st == "flight" or st == "resumed":
                recs[ts] = "cancelled"
            elif st == "memory":
                recs[ts] = "forgotten"  # no local reader (see above): one step
            elif st == "released":
                if not ts.dependents:
                    recs[ts] = "forgotten"
            elif st != "cancelled":
                recs[ts] = "released"
        self._drain(recs, ev, out)

    def _on_scheduler_lost(self, ev: SchedulerLost, out: list[Any]) -> None:
        """Release all the scheduler asked for; keep every value held (it counted each
        one here, through ``TaskFinished``/``AddKeys``/data updates), to offer again on
        registration (``held``). Running tasks and transfers become ``cancelled``: the
        shell cannot stop a task thread, and what they bring is dropped on arrival."""
        tasks = self.tasks
        self._scattered.clear()  # no free sent on the lost stream can still come
        for ts in tasks.values():
            if ts.state == "memory":
                ts.wanted = True  # not released with its local dependents below
        # A second pass for what the first kept for local readers that it then released
        # (a resumed transfer kept in flight for a dependent freed after it).
        for _ in range(2):
            gone = [k for k, ts in tasks.items() if ts.state != "memory" and ts.state != "cancelled"]
            if not gone:
                break
            self._on_free_keys(FreeKeys(ev.stimulus_id, ev.now, gone), out)

    def held(self) -> dict[Key, int]:
        """The values this worker holds, with their sizes: ``AddWorker.data`` on rejoining."""
        return {key: ts.nbytes for key, ts in self.tasks.items() if ts.state == "memory"}

    @staticmethod
    def closing_is_loss(msg: CloseWorker) -> bool:
        """A ``CloseWorker`` for silence (see ``HEARTBEAT_TIMEOUT``): the scheduler gave
        this worker up while the link was cut; it is alive and rejoins."""
        return msg.reason.startswith(HEARTBEAT_TIMEOUT)

    def _on_steal_request(self, ev: StealRequest, out: list[Any]) -> None:
        ts = self.tasks.get(ev.key)
        state = ts.state if ts is not None else None
        out.append(ToScheduler(StealResponse(ev.stimulus_id, ev.now, self.address, ev.key, state)))
        if ts is None:
            return
        if state in STEALABLE:
            ts.wanted = False
            self._step(ts, "released", ev, out)
        elif state in ("fetch", "flight", "missing") and not ts.dependents:
            ts.wanted = False
            self._step(ts, "cancelled" if state == "flight" else "released", ev, out)

    def _fetch_request(self, ts: WorkerTask, recs: Recs) -> None:
        """Someone wants ``ts``'s value here (a replica): fetch it unless on its way."""
        st = ts.state
        if st == "released" or st == "error":
            recs[ts] = "fetch"
        elif st == "cancelled":
            recs[ts] = "flight" if ts.previous == "flight" else "resumed"
        elif st == "missing" and ts.who_has:
            recs[ts] = "fetch"

    def _on_acquire_replicas(self, ev: AcquireReplicas, out: list[Any]) -> None:
        recs: Recs = {}
        for key, holders in ev.who_has.items():
            ts = self._task(key)
            ts.wanted = True
            if ts.state == "memory":
                continue
            self._learn_holders(ts, holders)
            n = ev.nbytes.get(key)
            if n is not None:
                ts.nbytes = n
            self._fetch_request(ts, recs)
        self._drain(recs, ev, out)

    def _on_refresh_who_has(self, ev: RefreshWhoHas, out: list[Any]) -> None:
        recs: Recs = {}
        for key, holders in ev.who_has.items():
            ts = self.tasks.get(key)
            if ts is None or ts.state == "memory":
                continue
            self._set_who_has(ts, holders)
            if ts.state == "missing" and ts.who_has:
                recs[ts] = "fetch"
            elif ts.state == "fetch" and not ts.who_has:
                recs[ts] = "missing"
        self._drain(recs, ev, out)

    def _on_execute_success(self, ev: ExecuteSuccess, out: list[Any]) -> None:
        ts = self.tasks.get(ev.key)
        if ts is None:
            out.append(DeleteData(ev.key))  # not ours any more: do not leak the value
            return
        st = ts.state
        if st in RUNNING_STATES:
            ts.nbytes = ev.nbytes
            out.append(
                ToScheduler(
                    TaskFinished(
                        ev.stimulus_id, ev.now, self.address, ts.key, ev.nbytes,
                        ev.type_name, ev.start, ev.stop, ts.run_id,
                    )
                )
            )  # fmt: skip
            self._step(ts, "memory", ev, out)
        elif st == "cancelled":
            out.append(DeleteData(ts.key))
            self._step(ts, "released", ev, out)
        elif st == "resumed":
            ts.nbytes = ev.nbytes
            self._step(ts, "memory", ev, out)
        else:
            raise InvalidTransition(ts.key, st, "memory", self.story(ts.key))

    def _on_execute_failure(self, ev: ExecuteFailure, out: list[Any]) -> None:
        ts = self.tasks.get(ev.key)
        if ts is None:
            return
        st = ts.state
        if st in RUNNING_STATES:
            out.append(
                ToScheduler(
                    TaskErred(
                        ev.stimulus_id, ev.now, self.address, ts.key, ev.exception,
                        ev.traceback, ev.exception_text, ev.traceback_text, ev.start, ev.stop,
                        ts.run_id,
                    )
                )
            )  # fmt: skip
            self._step(ts, "error", ev, out)
        elif st == "cancelled":
            self._step(ts, "released", ev, out)
        elif st == "resumed":
            assert ts.next is not None
            self._step(ts, ts.next, ev, out)
        else:
            raise InvalidTransition(ts.key, st, "error", self.story(ts.key))

    def _on_secede(self, ev: SecedeEvent, out: list[Any]) -> None:
        ts = self.tasks.get(ev.key)
        if ts is None:
            return
        if ts.state == "executing":
            out.append(
                ToScheduler(
                    LongRunning(ev.stimulus_id, ev.now, self.address, ts.key, ev.compute_duration)
                )
            )
            self._step(ts, "long-running", ev, out)
        elif ts.state in ("cancelled", "resumed"):
            secede_cancelled(self, ts)

    def _on_reschedule(self, ev: RescheduleEvent, out: list[Any]) -> None:
        ts = self.tasks.get(ev.key)
        if ts is None:
            return
        st = ts.state
        if st in RUNNING_STATES:
            out.append(ToScheduler(Reschedule(ev.stimulus_id, ev.now, self.address, ts.key)))
            ts.wanted = False
            self._step(ts, "released", ev, out)
        elif st == "cancelled":
            self._step(ts, "released", ev, out)
        elif st == "resumed":
            assert ts.next is not None
            self._step(ts, ts.next, ev, out)
        else:
            raise InvalidTransition(ts.key, st, "rescheduled", self.story(ts.key))

    def _gather_done(
        self,
        peer: str,
        arrived: dict[Key, int],
        said_missing: bool,
        ev: Any,
        out: list[Any],
        unusable: Sequence[Key] = (),
        peer_seq: int | None = None,
    ) -> None:
        """Settle the one in-flight ``GatherDep`` to ``peer``: keys not arrived failed.

        Either way ``peer`` stops being a holder here. It becomes the ``errant_worker`` of
        a later ``MissingData`` only if it *said* it lacks the keys: after a failed
        transfer we do not know that, and the scheduler drops a holder it is told about.
        """
        batch = self.in_flight.pop(peer, None)
        self.transfer_incoming_bytes -= self.in_flight_bytes.pop(peer, 0)
        self._fetch_dirty = True
        if batch is None:
            # nothing asked: a stale answer; do not leak the values
            out.extend(DeleteData(key) for key in arrived)
            return
        # cancelled transfers end first, so that no transition below mistakes one
        # for a transfer still running (and "uncancels" it)
        ordered = sorted(batch, key=_serial)
        recs: Recs = {}
        for ts in ordered:
            if ts.state == "cancelled":
                if ts.key in arrived:
                    out.append(DeleteData(ts.key))
                recs[ts] = "released"
        self._drain(recs, ev, out)
        for ts in ordered:
            st = ts.state
            if st != "flight" and st != "resumed":
                continue
            n = arrived.get(ts.key)
            if n is not None:
                ts.nbytes = n
                recs[ts] = "memory"
            else:
                if peer in ts.who_has:  # (never the shared empty set)
                    cast("set[str]", ts.who_has).discard(peer)
                ts.errant_peer = peer if said_missing and ts.key not in unusable else None
                ts.errant_seq = peer_seq if ts.errant_peer is not None else None
                recs[ts] = "waiting" if st == "resumed" else "fetch"
        self._drain(recs, ev, out)

    def _on_gather_success(self, ev: GatherDepSuccess, out: list[Any]) -> None:
        self._gather_done(ev.peer, ev.data, True, ev, out, ev.unusable, ev.peer_seq)

    def _on_gather_failure(self, ev: GatherDepFailure, out: list[Any]) -> None:
        self._gather_done(ev.peer, {}, False, ev, out)

    def _on_update_data(self, ev: WorkerUpdateData, out: list[Any]) -> None:
        recs: Recs = {}
        self.scatter_seq += 1
        seq = self.scatter_seq
        for key, n in ev.data.items():
            ts = self._task(key)
            st = ts.state
            if st == "memory":
                ts.wanted = True
                self._resize(ts, n)
            elif st in ("released", "fetch", "missing"):
                ts.wanted = True
                ts.nbytes = n
                recs[ts] = "memory"
            else:  # being computed or fetched here: that copy wins, drop the scattered one
                out.append(DeleteData(key))
                continue
            self._scattered[key] = seq
        self._drain(recs, ev, out)

    def _on_memory_measured(self, ev: MemoryMeasured, out: list[Any]) -> None:
        th = self.thresholds
        pm = ev.process_memory
        self.process_memory = pm
        excess = mp.process_excess(pm, th)
        if excess:
            for key in mp.choose_spill(iter(self._lru.items()), excess):
                self._spill(key, out)
        paused = mp.should_pause(pm, th)
        status = "paused" if paused else "running"
        if status != self.status:
            self.status = status
            if not paused:
                self._fetch_dirty = True
            out.append(
                ToScheduler(WorkerStatusChange(ev.stimulus_id, ev.now, self.address, status))
            )

    def _on_spill_failed(self, ev: SpillFailed, out: list[Any]) -> None:
        ts = self.tasks.get(ev.key)
        if ts is None or ts.state != "memory":
            return
        ts.spillable = False
        if ts.key in self.spilled:
            self._end_write(ts.key)
            self.spilled.remove(ts.key)
            self.spilled_bytes -= ts.nbytes
            self.in_memory.add(ts.key)
            self.memory_bytes += ts.nbytes
        self._lru.pop(ts.key, None)

    def _on_spill_written(self, ev: SpillWritten, out: list[Any]) -> None:
        """Files complete: those bytes have left RAM. A key whose write is no longer
        pending (unspilled, dropped or failed since) is ignored. Tasks held back by the
        write-ahead threshold start in ``handle``'s decisions after the batch."""
        for key in ev.keys:
            self._end_write(key)


def _serial(ts: WorkerTask) -> int:
    return ts.serial


_HANDLERS: Final[dict[type[Any], Callable[[WorkerState, Any, list[Any]], None]]] = {
    ComputeTask: WorkerState._on_compute_task,
    FreeKeys: WorkerState._on_free_keys,
    StealRequest: WorkerState._on_steal_request,
    AcquireReplicas: WorkerState._on_acquire_replicas,
    RefreshWhoHas: WorkerState._on_refresh_who_has,
    ExecuteSuccess: WorkerState._on_execute_success,
    ExecuteFailure: WorkerState._on_execute_failure,
    SecedeEvent: WorkerState._on_secede,
    RescheduleEvent: WorkerState._on_reschedule,
    GatherDepSuccess: WorkerState._on_gather_success,
    GatherDepFailure: WorkerState._on_gather_failure,
    WorkerUpdateData: WorkerState._on_update_data,
    MemoryMeasured: WorkerState._on_memory_measured,
    SpillFailed: WorkerState._on_spill_failed,
    SpillWritten: WorkerState._on_spill_written,
    SchedulerLost: WorkerState._on_scheduler_lost,
}
