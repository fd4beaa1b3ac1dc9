"""The scheduler core: every decision about tasks, workers and clients, without I/O.

``SchedulerState.handle(*events)`` is the only way in. Each event is dispatched through
a ``dict[type, handler]``; handlers update worker/client bookkeeping and ask for task
state changes, which live in ``scheduler_transitions`` (h11's rule). Recommendations are
drained to a fixed point before the next event, and the effects (messages for workers
and clients) are returned in the order they were decided, so a shell that sends them in
order never lets a ``FreeKeys`` overtake the ``ComputeTask`` it should follow.

Records are slotted and sets of keys (not of records) so the shells can read them as
plain data; placement and stealing are pure policies in their own modules.
"""

from __future__ import annotations

import heapq
import math
import pickle
from collections.abc import Callable
from typing import Any, Final, cast

from trioscheduler.core import placement, recovery, replicas, stealing
from trioscheduler.core import scheduler_client_events as ce
from trioscheduler.core import scheduler_retirement as retirement
from trioscheduler.core import scheduler_transitions as tr
from trioscheduler.core.errors import InvalidTransition, KilledWorker, NoValidWorkerError
from trioscheduler.core.messages import (
    FIRE_AND_FORGET,
    HEARTBEAT_TIMEOUT,
    ActiveMemoryManager,
    AddClient,
    AddKeys,
    AddWorker,
    CancelAll,
    CancelKeys,
    ClientDesiresKeys,
    ClientId,
    ClientReleasesKeys,
    CloseWorker,
    DropReplicas,
    FreeKeys,
    Key,
    KeyCancelled,
    KeyErred,
    KeyInMemory,
    Log,
    LongRunning,
    MissingData,
    Recovered,
    ReleaseWorkerData,
    RemoveClient,
    RemoveWorker,
    Reschedule,
    RetireWorker,
    RetryKeys,
    StealResponse,
    TaskErred,
    TaskFinished,
    Tick,
    ToClient,
    ToWorker,
    UpdateData,
    UpdateGraph,
    WorkerAddr,
    WorkerHeartbeat,
    WorkerStatusChange,
)
from trioscheduler.core.scheduler_invariants import validate_scheduler
from trioscheduler.core.scheduler_records import (
    STATES,
    ClientRecord,
    ErrorInfo,
    PendingSteal,
    TaskPrefix,
    TaskRecord,
    WorkerRecord,
    key_prefix,
    worker_host,
)
from trioscheduler.core.story import StoryEntry, StoryLog

# --------------------------------------------------------------------------------------
# The state
# --------------------------------------------------------------------------------------


_OUTCOMES: Final = (KeyInMemory, KeyErred, KeyCancelled)
"""What a client hears when a key it wants is done, one way or another."""


class SchedulerState:
    """All the scheduler knows. Change it only through ``handle``."""

    __slots__ = (
        "tasks", "workers", "clients", "aliases", "hosts", "prefixes", "idle", "saturated", "running",
        "unrunnable", "steals", "state_counts", "generation", "log", "worker_timeout",
        "allowed_failures", "steal", "validate", "bandwidth", "default_duration",
        "total_nthreads", "retiring", "_story_append", "_effects", "recs", "stimulus_id", "now",
        "_open_free", "round_robin", "retried", "worker_saturation", "worker_backlog", "queuing",
        "open", "queued", "_queue_heap", "_queue_seq", "runs", "_run_seq", "former_names", "no_workers_timeout",
        "recovery", "forget_done", "amm_interval", "amm_due", "amm_dropped", "replicated",
    )  # fmt: skip

    def __init__(
        self,
        *,
        worker_timeout: float = 30.0,
        allowed_failures: int = 3,
        steal: bool = True,
        validate: bool = False,
        bandwidth: float = 100e6,
        default_duration: float = 0.5,
        story_length: int = 100_000,
        worker_saturation: float = 1.1,
        worker_backlog: float = 0.05,
        no_workers_timeout: float | None = None,
        amm_interval: float | None = None,
    ) -> None:
        """``worker_saturation`` (dask's ``distributed.scheduler.worker-saturation``;
        ``inf``: no queuing) and ``worker_backlog`` (seconds of estimated work per thread)
        decide when root tasks wait in ``queued``: a worker takes more while it holds fewer
        than ``ceil(nthreads * worker_saturation)`` tasks *or* less than ``worker_backlog``
        seconds per thread. The second clause keeps trivial tasks flowing in a real cluster
        (a bare 1.1 leaves a worker idle for every round trip); the first bounds how many
        slow or unknown-duration tasks (``default_duration``) a worker is handed at once,
        which bounds memory. The backlog has hysteresis: a worker filled to it takes more
        only once it is down to half, then a run of consecutive tasks (siblings of a
        reduction share a worker, so most reductions need no transfer).
        ``amm_interval``: seconds between runs of the Active Memory Manager (None: off;
        ``scheduler_retirement.amm_tick``)."""
        if not worker_saturation > 0:
            raise ValueError(
                f"worker_saturation must be > 0 (inf: no queuing), not {worker_saturation!r}"
            )
        self.tasks: dict[Key, TaskRecord] = {}
        self.workers: dict[WorkerAddr, WorkerRecord] = {}
        self.clients: dict[ClientId, ClientRecord] = {}
        self.aliases: dict[str, WorkerAddr] = {}  # worker name -> address
        self.hosts: dict[str, set[WorkerAddr]] = {}  # host part of addresses -> addresses
        self.prefixes: dict[str, TaskPrefix] = {}
        # running workers with a free thread slot (dict: ordered, O(1) first pick)
        self.idle: dict[WorkerAddr, WorkerRecord] = {}
        self.saturated: set[WorkerAddr] = set()  # more tasks than threads: steal victims
        self.running: list[WorkerRecord] = []  # status == running, for round robin
        self.unrunnable: dict[Key, float] = {}  # tasks in no-worker -> since when
        # dask's distributed.scheduler.no-workers-timeout: unrunnable this long -> erred
        self.no_workers_timeout = no_workers_timeout
        # address -> name of workers that left: a task pinned to the address of a worker
        # its nanny restarted (same name, new address) follows it (see placement)
        self.former_names: dict[WorkerAddr, str] = {}
        self.steals: dict[Key, PendingSteal] = {}
        self.state_counts: dict[str, int] = dict.fromkeys(STATES, 0)
        self.generation = 0
        self.log = StoryLog(story_length)
        self._story_append = self.log.appenders()
        self.worker_timeout = worker_timeout
        self.allowed_failures = allowed_failures
        self.steal = steal
        self.validate = validate
        self.bandwidth = bandwidth
        self.default_duration = default_duration
        self.total_nthreads = 0
        self.retiring: set[WorkerAddr] = set()  # iterated sorted (deterministic)
        self._effects: list[Any] = []
        self.recs: dict[Key, str] = {}
        self.stimulus_id = ""
        self.now = 0.0
        # the FreeKeys each worker may still get more keys in (with its keys list)
        self._open_free: dict[WorkerAddr, tuple[list[Key], FreeKeys]] = {}
        self.round_robin = 0
        self.retried: list[TaskRecord] = []  # retried tasks: release them if nobody needs them
        # fire-and-forget keys whose outcome came: released once the event is handled
        self.forget_done: list[Key] = []
        self.worker_saturation = worker_saturation
        self.worker_backlog = worker_backlog
        self.queuing = worker_saturation != math.inf
        # running workers with room for queued root tasks (ordered: filled one at a time)
        self.open: dict[WorkerAddr, WorkerRecord] = {}
        # queued tasks: key -> serial of its live entry in ``_queue_heap``, a heap of
        # ``(priority, serial, key)`` with lazy deletion (stale entries are skipped)
        self.queued: dict[Key, int] = {}
        self._queue_heap: list[tuple[Any, int, Key]] = []
        self._queue_seq = 0
        # processing tasks -> the run id of their ComputeTask (answers to others are stale)
        self.runs: dict[Key, int] = {}
        self._run_seq = 0
        # after a restart from the log: who is still awaited (``core/recovery.py``)
        self.recovery: recovery.Recovery | None = None
        self.amm_interval = amm_interval
        self.amm_due: float | None = None  # ``now`` of its next run (None: at the next tick + interval)
        self.amm_dropped = 0  # copies it dropped, in all
        # keys held by two workers or more (kept by ``add_replica``/``remove_replica``/
        # ``memory_released``): the AMM reads these, not every task; a dict used as an
        # insertion-ordered set, so its plans do not depend on hashing
        self.replicated: dict[Key, None] = {}

    def busy(self) -> bool:
        """Work is waiting, queued, unrunnable or running: the scheduler is not idle
        (``Scheduler(idle_timeout=)`` closes an idle one, as dask's)."""
        c = self.state_counts
        return bool(c["processing"] or c["waiting"] or c["queued"] or c["no-worker"])

    # ---------------------------------------------------------------- entry point

    def handle(self, *events: Any) -> list[Any]:
        """Apply ``events`` in order; return the effects to carry out, in order."""
        effects: list[Any] = []
        self._effects = effects
        for ev in events:
            handler = _HANDLERS.get(type(ev))
            if handler is None:
                raise TypeError(f"not a scheduler event: {ev!r:.200}")
            self.stimulus_id = ev.stimulus_id
            self.now = ev.now
            handler(self, ev)
            if self.recs:
                self.drain()
            if self.forget_done:
                self._release_fire_and_forget()
            if self.retried:
                self._release_unneeded_retries()
            if self.retiring:
                retirement.retire_pending(self)
            if self.queued and self.open:
                self._fill_queue_slots()
            self._open_free.clear()
            if self.validate:
                validate_scheduler(self)
        return effects

    def story(self, *keys: Key) -> list[StoryEntry]:
        """What happened to ``keys``: ``(key, start, finish, stimulus_id, now)`` entries."""
        return self.log.story(*keys)

    def log_tap(self, on: bool) -> tuple[list[Any], ...] | None:
        """Also copy every transition into five lists (key, start, finish, stimulus_id,
        now) that the caller empties, or stop doing so. Off, transitions cost nothing more."""
        if not on:
            self._story_append = self.log.appenders()
            return None
        self._story_append, tap = self.log.tapped_appenders()
        return tap

    # ---------------------------------------------------------------- plumbing for transitions

    def drain(self) -> None:
        """Apply recommendations until none are left (LIFO: depth first, like dask)."""
        recs = self.recs
        tasks = self.tasks
        while recs:
            key, finish = recs.popitem()
            ts = tasks.get(key)
            if ts is not None:
                self.transition(ts, finish)  # (not a bound-method local: compiled, a C call)

    def _fill_queue_slots(self) -> None:
        """Hand queued tasks, best priority first, to workers with room. One worker is
        filled before the next, so consecutive tasks (siblings of a reduction) share it."""
        open_ = self.open
        queued = self.queued
        heap = self._queue_heap
        tasks = self.tasks
        while open_ and queued:
            _, seq, key = heapq.heappop(heap)
            if queued.get(key) == seq:
                self.transition(tasks[key], "processing", worker=next(iter(open_.values())))
        if self.recs:
            self.drain()

    def _release_unneeded_retries(self) -> None:
        """A retried task nobody wants and no dependent waits for goes back to rest."""
        while self.retried:
            retried, self.retried = self.retried, []
            for ts in retried:
                if self.tasks.get(ts.key) is ts:
                    self.maybe_release(ts)
            self.drain()

    def transition(
        self,
        ts: TaskRecord,
        finish: str,
        *,
        worker: WorkerRecord | None = None,
        error: ErrorInfo | None = None,
    ) -> None:
        """Move ``ts`` to ``finish`` through the table; record the story. ``worker``: the
        holder for ``-> memory`` (or a worker with room for ``queued -> processing``);
        ``error``: the failure for ``-> erred``."""
        start = ts.state
        if start == finish:
            return
        edges = tr.EDGES.get(start)
        fn = None if edges is None else edges.get(finish)
        if fn is None:
            raise InvalidTransition(ts.key, start, finish, self.log.story(ts.key))
        fn(self, ts, worker, error)
        new = ts.state
        if new != start:
            ak, a_s, af, ai, an = self._story_append
            ak(ts.key)
            a_s(start)
            af(new)
            ai(self.stimulus_id)
            an(self.now)
            counts = self.state_counts
            counts[start] -= 1
            counts[new] += 1

    def recommend(self, key: Key, finish: str) -> None:
        self.recs[key] = finish

    def to_worker(self, addr: WorkerAddr, msg: Any) -> None:
        self._open_free.pop(addr, None)
        self._effects.append(ToWorker(addr, msg))

    def to_client(self, client: ClientId, msg: Any) -> None:
        if client == FIRE_AND_FORGET:  # nobody listens: an outcome ends the want (dask)
            if type(msg) in _OUTCOMES:
                self.forget_done.append(msg.key)
            return
        self._effects.append(ToClient(client, msg))

    def _release_fire_and_forget(self) -> None:
        keys, self.forget_done = self.forget_done, []
        cs = self.clients.get(FIRE_AND_FORGET)
        if cs is not None:
            for key in keys:
                self.drop_want(cs, key)
            if self.recs:
                self.drain()

    def emit(self, effect: Any) -> None:
        self._effects.append(effect)

    def log_msg(self, level: str, text: str) -> None:
        self._effects.append(Log(level, text))

    def free_on(self, addr: WorkerAddr, key: Key) -> None:
        """Tell ``addr`` to drop ``key``; consecutive frees to one worker share a message,
        which names the latest scatter of ``key`` there we know of (see ``FreeKeys``)."""
        open_ = self._open_free.get(addr)
        if open_ is None:
            ws = self.workers.get(addr)
            if ws is None or ws.status == "closed":
                return
            msg = FreeKeys(self.stimulus_id, self.now, [key], {})
            self._effects.append(ToWorker(addr, msg))
            self._open_free[addr] = open_ = (cast("list[Key]", msg.keys), msg)
        else:
            open_[0].append(key)
        ts = self.tasks.get(key)
        if ts is not None and ts.extra is not None and ts.extra.scatter_seqs:
            ws = self.workers.get(addr)
            seq = ts.extra.scatter_seqs.get(ws) if ws is not None else None
            if seq is not None:
                cast("dict[Key, int]", open_[1].seqs)[key] = seq

    def update_worker_sets(self, ws: WorkerRecord) -> None:
        """Keep ``idle``/``saturated`` true for ``ws`` after its load changed (O(1))."""
        addr = ws.address
        busy = len(ws.processing) - len(ws.long_running)
        if ws.status == "running":
            if busy + ws.incoming_steals < ws.nthreads:
                self.idle[addr] = ws
            else:
                self.idle.pop(addr, None)
            if busy > ws.nthreads:
                self.saturated.add(addr)
            else:
                self.saturated.discard(addr)
            if self.queuing:
                n = busy + ws.incoming_steals
                if n < ws.queue_slots or ws.occupancy < 0.5 * ws.backlog:
                    self.open[addr] = ws  # room: take queued tasks
                elif ws.occupancy >= ws.backlog:
                    self.open.pop(addr, None)  # full
                # else between the marks: keep filling, or keep waiting (hysteresis)
        else:
            self.idle.pop(addr, None)
            self.open.pop(addr, None)
            if busy > 0 and ws.status != "closed":
                self.saturated.add(addr)
            else:
                self.saturated.discard(addr)

    def rebuild_running(self) -> None:
        self.running = [ws for ws in self.workers.values() if ws.status == "running"]

    def duration_estimate(self, ts: TaskRecord) -> float:
        avg = ts.prefix.duration_average
        return avg if avg >= 0 else self.default_duration

    # ---------------------------------------------------------------- small helpers

    def client_record(self, client: ClientId) -> ClientRecord:
        cs = self.clients.get(client)
        if cs is None:
            cs = self.clients[client] = ClientRecord(client, last_seen=self.now)
        return cs

    def _prefix(self, key: Key) -> TaskPrefix:
        name = key_prefix(key)
        tp = self.prefixes.get(name)
        if tp is None:
            tp = self.prefixes[name] = TaskPrefix(name)
        return tp

    def new_task(self, key: Key, run_spec: Any, priority: tuple[Any, ...]) -> TaskRecord:
        tp = self._prefix(key)
        tp.n_tasks += 1
        ts = TaskRecord(key, run_spec, priority, tp)
        self.tasks[key] = ts
        self.state_counts["released"] += 1
        return ts

    def add_want(self, cs: ClientRecord, ts: TaskRecord, notify: bool = True) -> None:
        """``cs`` holds a future for ``ts``: tell it at once if the outcome is known."""
        if ts.key in cs.wants:
            return
        cs.wants.add(ts.key)
        tr.want(ts, cs)
        if notify:
            self.tell_outcome(cs, ts)

    def tell_outcome(self, cs: ClientRecord, ts: TaskRecord) -> None:
        """Tell ``cs`` the outcome of ``ts`` if known; if released, compute it again."""
        if ts.state == "memory":
            self.to_client(cs.client, KeyInMemory(ts.key, ts.type_name))
        elif ts.state == "erred":
            self.to_client(
                cs.client,
                KeyErred(ts.key, ts.exception or b"", ts.traceback or b"", ts.exception_text),
            )
        elif ts.state == "released" and ts.key not in self.recs:
            self.recs[ts.key] = "waiting"

    def drop_client(self, client: ClientId) -> None:
        """``client`` is gone: its wants end."""
        cs = self.clients.pop(client, None)
        if cs is None:
            return
        for key in sorted(cs.wants, key=repr):  # a set: sorted, so replays agree
            self.drop_want(cs, key)

    def drop_want(self, cs: ClientRecord, key: Key) -> None:
        if key not in cs.wants:
            return
        cs.wants.discard(key)
        ts = self.tasks.get(key)
        if ts is None:
            return
        tr.unwant(ts, cs.client)
        self.maybe_release(ts)

    def maybe_release(self, ts: TaskRecord) -> None:
        """Recommend releasing/forgetting ``ts`` if no client and no dependent needs it."""
        if ts.wanted_by or ts.n_waiters:
            return
        st = ts.state
        if st in ("memory", "waiting", "processing", "no-worker", "queued"):
            self.recs[ts.key] = "released"
        elif st in ("released", "erred") and not ts.dependents:
            self.recs[ts.key] = "forgotten"

    # ---------------------------------------------------------------- worker events

    def _on_add_worker(self, ev: AddWorker) -> None:
        old = self.workers.get(ev.worker)
        if old is not None:
            if old.status == recovery.RECOVERING:
                recovery.worker_back(self, ev)  # keeps the replicas it still holds
            self.remove_worker(old, expected=True, reason="re-registered")
        ws = WorkerRecord(
            ev.worker, max(ev.nthreads, 1), ev.memory_limit, ev.name, ev.nanny,
            dict(ev.resources), last_seen=ev.now, incarnation=ev.incarnation,
        )  # fmt: skip
        if self.queuing:
            ws.queue_slots = max(1, math.ceil(ws.nthreads * self.worker_saturation))
            ws.backlog = ws.nthreads * self.worker_backlog
        self.workers[ev.worker] = ws
        if ev.name is not None:
            self.aliases[str(ev.name)] = ev.worker
        self.hosts.setdefault(worker_host(ev.worker), set()).add(ev.worker)
        self.total_nthreads += ws.nthreads
        self.rebuild_running()
        self.update_worker_sets(ws)
        for key, nbytes in ev.data.items():
            replicas.worker_has(self, ws, key, nbytes, accept=True)
        self.recheck_unrunnable()

    def recheck_unrunnable(self) -> None:
        recs = self.recs
        for key in self.unrunnable:
            # a pending recommendation (``waiting``: an input was just lost) wins
            recs.setdefault(key, "processing")

    def _on_remove_worker(self, ev: RemoveWorker) -> None:
        ws = self.workers.get(ev.worker)
        if ws is not None:
            self.remove_worker(ws, expected=ev.expected, reason=ev.reason)

    def remove_worker(self, ws: WorkerRecord, *, expected: bool, reason: str) -> None:
        """Forget ``ws``: its replicas are gone, its processing tasks go elsewhere."""
        addr = ws.address
        if not expected:
            self.log_msg("warning", f"worker {addr} lost ({reason or 'no reason given'})")
        ws.status = "closed"
        self.update_worker_sets(ws)
        self.rebuild_running()
        self.retiring.discard(addr)
        if ws.name is not None and self.aliases.get(str(ws.name)) == addr:
            del self.aliases[str(ws.name)]
        if ws.name is not None:
            former = self.former_names
            former[addr] = str(ws.name)
            if len(former) > 10_000:  # bounded: forget the oldest departures
                del former[next(iter(former))]
        host = worker_host(addr)
        on_host = self.hosts.get(host)
        if on_host is not None:
            on_host.discard(addr)
            if not on_host:
                del self.hosts[host]
        tasks = self.tasks
        for key in list(ws.has_what):
            ts = tasks[key]
            tr.remove_replica(self, ts, ws)
            if not ts.who_has and ts.state == "memory":
                self.recs.pop(key, None)
                self.transition(ts, "released")
        for key in list(ws.processing):
            ts = tasks[key]
            self.recs.pop(key, None)
            if not expected:
                ts.suspicious += 1
                if ts.killed_on is None:
                    ts.killed_on = []
                ts.killed_on.append(addr)
                if ts.suspicious >= self.allowed_failures:
                    exc = KilledWorker(key, list(ts.killed_on), self.allowed_failures)
                    error = ErrorInfo(pickle.dumps(exc), b"", str(exc), "", key)
                    self.transition(ts, "erred", error=error)
                    continue
            self.transition(ts, "waiting")
        self.total_nthreads -= ws.nthreads
        del self.workers[addr]
        for pending in self.steals.values():
            if pending.thief == addr:  # the victim's answer will find no thief: reschedule
                pending.thief = ""
        for other in sorted(self.retiring):
            ows = self.workers.get(other)
            if ows is not None:
                retirement.retire_progress(self, ows)

    def _on_heartbeat(self, ev: WorkerHeartbeat) -> None:
        ws = self.workers.get(ev.worker)
        if ws is not None:
            ws.last_seen = ev.now
            if isinstance(ev.metrics, dict):
                ws.metrics = ev.metrics

    def _on_status(self, ev: WorkerStatusChange) -> None:
        ws = self.workers.get(ev.worker)
        if ws is None or ws.status in ("closing", "closed") or ev.status == ws.status:
            return
        if ev.status not in ("running", "paused"):
            self.log_msg("warning", f"worker {ev.worker} reported unknown status {ev.status!r}")
            return
        ws.status = ev.status
        ws.last_seen = ev.now
        self.rebuild_running()
        self.update_worker_sets(ws)
        if ev.status == "running":
            self.recheck_unrunnable()

    def _on_task_finished(self, ev: TaskFinished) -> None:
        ws = self.workers.get(ev.worker)
        if ws is None:
            return
        ws.last_seen = ev.now
        ts = self.tasks.get(ev.key)
        if ts is None:
            self.free_on(ws.address, ev.key)
            return
        if ts.state == "processing" and ts.processing_on == ws.address:
            if ev.run_id and ev.run_id != self.runs.get(ts.key):
                # the answer to an older assignment to this worker, which has since
                # dropped that value (FreeKeys) and runs the new one: wait for that
                return
            if ev.stop > ev.start:
                tp = ts.prefix
                d = ev.stop - ev.start
                tp.duration_average = (
                    d if tp.duration_average < 0 else 0.5 * (tp.duration_average + d)
                )
                tp.n_finished += 1
            ts.nbytes = ev.nbytes
            ts.type_name = ev.type_name
            self.recs.pop(ts.key, None)
            self.transition(ts, "memory")
            if ws.status == "closing":
                self.drain()
                retirement.retire_progress(self, ws)
        elif ts.state == "memory":
            if ws.address not in ts.who_has:
                tr.add_replica(self, ts, ws)
        else:  # stale: the task is elsewhere or no longer wanted
            self.free_on(ws.address, ev.key)

    def _on_task_erred(self, ev: TaskErred) -> None:
        ws = self.workers.get(ev.worker)
        if ws is None:
            return
        ws.last_seen = ev.now
        ts = self.tasks.get(ev.key)
        if ts is not None and ts.state == "memory" and not ev.run_id:
            # A worker found the value cannot travel (the holder cannot serialize it, or
            # a fetcher cannot load it): unusable wherever it is needed, so the key errs,
            # and its dependents with it, instead of being fetched for ever.
            self.recs.pop(ts.key, None)
            self.transition(ts, "released")
            self.recs.pop(ts.key, None)
            error = ErrorInfo(
                ev.exception, ev.traceback, ev.exception_text, ev.traceback_text, ts.key
            )
            self.transition(ts, "erred", error=error)
            return
        if ts is None or ts.state != "processing" or ts.processing_on != ws.address:
            self.free_on(ws.address, ev.key)  # stale: computed elsewhere, or released
            return
        if ev.run_id and ev.run_id != self.runs.get(ts.key):
            return  # a failure of an older assignment to this worker (see TaskFinished)
        self.recs.pop(ts.key, None)
        if ts.retries > 0:
            ts.retries -= 1
            self.log_msg(
                "info", f"task {ts.key!r} failed on {ws.address}; retrying ({ts.retries} left)"
            )
            self.transition(ts, "waiting")
        else:
            error = ErrorInfo(
                ev.exception, ev.traceback, ev.exception_text, ev.traceback_text, ts.key
            )
            self.transition(ts, "erred", error=error)

    def _on_long_running(self, ev: LongRunning) -> None:
        ws = self.workers.get(ev.worker)
        ts = self.tasks.get(ev.key)
        if ws is None or ts is None or ts.processing_on != ws.address:
            return
        if ts.key in ws.long_running:
            return
        ws.long_running.add(ts.key)
        ws.occupancy -= ws.processing[ts.key]
        ws.processing[ts.key] = 0.0
        if not ws.processing or ws.occupancy < 0:
            ws.occupancy = max(ws.occupancy, 0.0)
        self.update_worker_sets(ws)

    def _on_reschedule(self, ev: Reschedule) -> None:
        ts = self.tasks.get(ev.key)
        if ts is None or ts.state != "processing" or ts.processing_on != ev.worker:
            return
        self.recs.pop(ts.key, None)
        self.transition(ts, "waiting")

    def _on_tick(self, ev: Tick) -> None:
        if self.recovery is not None:
            recovery.expire(self, ev.now)
        deadline = ev.now - self.worker_timeout
        for ws in list(self.workers.values()):
            if ws.last_seen < deadline and ws.address in self.workers:
                reason = f"{HEARTBEAT_TIMEOUT} {ev.now - ws.last_seen:.1f}s (timeout {self.worker_timeout}s)"
                self._effects.append(CloseWorker(ws.address, reason))
                self.remove_worker(ws, expected=False, reason=reason)
        timeout = self.no_workers_timeout
        if timeout is not None and self.unrunnable:
            for key, since in list(self.unrunnable.items()):
                if ev.now - since >= timeout:
                    ts = self.tasks[key]
                    exc = NoValidWorkerError(key, placement.describe_restrictions(ts), timeout)
                    self.recs.pop(key, None)
                    error = ErrorInfo(pickle.dumps(exc), b"", str(exc), "", key)
                    self.transition(ts, "erred", error=error)
        if self.amm_interval is not None:
            retirement.amm_tick(self, ev.now)
        if self.recs:
            self.drain()
        if self.steal:
            stealing.start_steals(self)


_HANDLERS: Final[dict[type[Any], Callable[[SchedulerState, Any], None]]] = {
    AddClient: ce.on_add_client,
    RemoveClient: ce.on_remove_client,
    UpdateGraph: ce.on_update_graph,
    UpdateData: ce.on_update_data,
    ClientDesiresKeys: ce.on_desires,
    ClientReleasesKeys: ce.on_releases,
    CancelKeys: ce.on_cancel,
    CancelAll: ce.on_cancel_all,
    RetryKeys: ce.on_retry,
    AddWorker: SchedulerState._on_add_worker,
    RemoveWorker: SchedulerState._on_remove_worker,
    RetireWorker: retirement.on_retire,
    DropReplicas: retirement.on_drop_replicas,
    ActiveMemoryManager: retirement.on_amm,
    WorkerHeartbeat: SchedulerState._on_heartbeat,
    WorkerStatusChange: SchedulerState._on_status,
    TaskFinished: SchedulerState._on_task_finished,
    TaskErred: SchedulerState._on_task_erred,
    AddKeys: replicas.on_add_keys,
    ReleaseWorkerData: replicas.on_release_worker_data,
    MissingData: replicas.on_missing_data,
    LongRunning: SchedulerState._on_long_running,
    Reschedule: SchedulerState._on_reschedule,
    StealResponse: stealing.on_steal_response,
    Tick: SchedulerState._on_tick,
    Recovered: recovery.on_recovered,
}
