"""A whole cluster over the pure cores, without I/O: for fuzzing and benchmarks.

``ClusterSimulator`` holds one ``SchedulerState``, any number of ``WorkerState``s and,
between them, one FIFO queue per (sender, receiver) pair, exactly like the shells'
streams: a scheduler effect ``ToWorker(w, msg)`` is queued for ``w``, a worker
instruction ``ToScheduler(msg)`` is queued for the scheduler. Clients talk to the
scheduler directly (their events are handled at once). The simulator plays each worker's
shell: it runs ``Execute`` (a simulated task computes a deterministic function of its
key and input values), answers ``GatherDep`` from the peer's data, moves values for
``Spill``/``Unspill``/``DeleteData`` (a spilled value is *being written* until a later
``finish_writes`` step reports ``SpillWritten``, as the real shell's writer thread does),
and checks that what it holds matches what the core believes it holds.

Every step is a method (deliver one message, finish one task, complete one transfer,
lose a worker, ...), so a hypothesis state machine can interleave them in any order;
``run_to_completion`` drives everything deterministically until nothing is left to do,
and ``check_outcome`` says whether every key a client still wants ended up in memory
with the right value (or erred for a reason the graph asked for).

Pure like the rest of ``core``: no clock (``now`` advances by a fixed step per event),
no randomness (graph builders take an injected ``random.Random``).
"""

from __future__ import annotations

import pickle
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from trioscheduler.core.messages import (
    FIRE_AND_FORGET,
    AddClient,
    AddWorker,
    CancelAll,
    CancelKeys,
    ClientDesiresKeys,
    ClientReleasesKeys,
    CloseWorker,
    DeleteData,
    Execute,
    ExecuteFailure,
    ExecuteSuccess,
    GatherDep,
    GatherDepFailure,
    GatherDepSuccess,
    Key,
    KeyCancelled,
    Log,
    MemoryMeasured,
    RemoveClient,
    RemoveWorker,
    RescheduleEvent,
    RetireWorker,
    RetryKeys,
    SecedeEvent,
    Spill,
    SpillFailed,
    SpillWritten,
    StealResponse,
    TaskSpec,
    Tick,
    ToClient,
    ToScheduler,
    ToWorker,
    Unspill,
    UpdateData,
    UpdateGraph,
    WorkerHeartbeat,
    WorkerUpdateData,
)
from trioscheduler.core.recorder import Recorder
from trioscheduler.core.scheduler import SchedulerState
from trioscheduler.core.sim_graphs import (
    Rng,
    expected_value,
    failure_flags,
    independent_graph,
    layered_graph,
    lineage,
    sinks,
    tree_graph,
)
from trioscheduler.core.sim_oracle import RunOracle, removes_workers
from trioscheduler.core.sim_outcome import check_outcome, check_shells
from trioscheduler.core.sim_records import (
    ALWAYS,
    SimRun,
    SimTask,
    SimulatedFailure,
    SimulationError,
    SimWorker,
    task_value,
)
from trioscheduler.core.worker import WorkerState

__all__ = [
    "ALWAYS", "RUN_SPEC", "SCHEDULER", "ClusterSimulator", "Rng", "SimTask", "SimWorker",
    "SimulatedFailure", "SimulationError", "independent_graph", "layered_graph", "sinks",
    "task_value", "tree_graph",
]  # fmt: skip

SCHEDULER = "scheduler"
"""The scheduler's name as a queue endpoint."""
RUN_SPEC = b"sim"
"""The opaque run spec of every simulated task (the simulator keeps the real graph)."""

SchedulerEndpoint = Callable[..., list[Any]]


class ClusterSimulator:
    """A cluster of pure cores joined by per-pair FIFO queues (see the module doc).

    ``record=True`` wraps every core in a ``Recorder`` (``scheduler_log``,
    ``worker_logs``); ``validate=True`` makes every core validate after every event.
    """

    def __init__(
        self,
        *,
        validate: bool = False,
        record: bool = False,
        worker_timeout: float = 1e9,
        allowed_failures: int = 3,
        steal: bool = True,
        time_step: float = 0.001,
        tally: bool = False,
        **scheduler_kwargs: Any,
    ) -> None:
        kw = dict(
            worker_timeout=worker_timeout, allowed_failures=allowed_failures, steal=steal,
            validate=validate, **scheduler_kwargs,
        )  # fmt: skip
        self.record = record
        self.validate = validate
        self.scheduler_core: Any = Recorder.scheduler(**kw) if record else SchedulerState(**kw)
        self.workers: dict[str, SimWorker] = {}
        self.queues: dict[tuple[str, str], deque[Any]] = {}
        self.graph: dict[Key, SimTask] = {}
        # only tasks built to fail: most graphs have none, and ending a run then looks
        # up a small dict instead of one as big as the graph
        self.fails_left: dict[Key, int] = {}
        self.wants: dict[str, set[Key]] = {}  # the clients' view: keys with live futures
        self.client_msgs: dict[str, dict[Key, Any]] = {}  # last message per client and key
        self.logs: list[Log] = []
        self.worker_logs: dict[str, list[list[Any]]] = {}
        self.required_names: set[str] = set()
        self.needs_resources: dict[str, float] = {}
        self.lost = 0  # workers lost unexpectedly (KilledWorker becomes possible)
        self.departed: list[SimWorker] = []  # workers gone (lost, closed): their stories
        # ``tally=True``: how many events of each type each kind of core handled
        self.event_counts: dict[str, int] | None = {} if tally else None
        # ``validate=True``: no task runs twice (or keeps running) without a reason
        self.oracle = RunOracle(allowed_failures) if validate else None
        self.now = 0.0
        self.time_step = time_step
        self._n = 0
        self._n_workers = 0
        self._values: dict[Key, int] = {}
        # key -> len(departed) at its first scatter: only a worker that left since then
        # can have taken a scattered copy with it (``sim_outcome``'s check of lost data)
        self.departed_before_scatter: dict[Key, int] = {}

    # ------------------------------------------------------------------ plumbing

    @property
    def scheduler(self) -> SchedulerState:
        core = self.scheduler_core
        return core.state if type(core) is Recorder else core  # type: ignore[no-any-return]

    @property
    def scheduler_log(self) -> list[list[Any]]:
        assert type(self.scheduler_core) is Recorder, "ClusterSimulator(record=True) records"
        return self.scheduler_core.log

    def _sid(self, kind: str) -> tuple[str, float]:
        self._n += 1
        self.now += self.time_step
        return f"{kind}-{self._n}", self.now

    def _count(self, events: Iterable[Any], where: str) -> None:
        counts = self.event_counts
        assert counts is not None
        for ev in events:
            name = f"{where}:{type(ev).__name__}"
            counts[name] = counts.get(name, 0) + 1
            if type(ev) is StealResponse:
                # the victim's answer to a request still pending: moved, refused, placed again
                p = self.scheduler.steals.get(ev.key)
                if p is not None and p.victim == ev.worker and p.stimulus_id == ev.stimulus_id:
                    name = f"scheduler:steal-answer={ev.state}"
                    counts[name] = counts.get(name, 0) + 1

    def _to_scheduler(self, *events: Any) -> None:
        self._route_effects(self._scheduler_handle(events))

    def _scheduler_handle(self, events: Sequence[Any]) -> list[Any]:
        if self.event_counts is not None:
            self._count(events, "scheduler")
        oracle = self.oracle
        core = self.scheduler_core
        if oracle is None or not any(removes_workers(ev) for ev in events):
            return core.handle(*events)  # type: ignore[no-any-return]
        # the oracle looks at who processed what just before a worker is removed; the
        # scheduler handles a batch event by event, so splitting it changes nothing
        effects: list[Any] = []
        todo: list[Any] = []
        for ev in events:
            if not removes_workers(ev):
                todo.append(ev)
                continue
            if todo:
                effects.extend(core.handle(*todo))
                todo = []
            before = oracle.processing_by_worker(self.scheduler)
            out = core.handle(ev)
            oracle.after_removals(self.scheduler, before, [ev], out)
            effects.extend(out)
        if todo:
            effects.extend(core.handle(*todo))
        return effects

    def _route_effects(self, effects: list[Any]) -> None:
        queues = self.queues
        workers = self.workers
        for eff in effects:
            t = type(eff)
            if t is ToWorker:
                addr = eff.worker
                if addr in workers:
                    q = queues.get((SCHEDULER, addr))
                    if q is None:
                        q = queues[(SCHEDULER, addr)] = deque()
                    q.append(eff.msg)
            elif t is ToClient:
                self._client_receives(eff.client, eff.msg)
            elif t is CloseWorker:
                self._close(eff.worker, eff.reason)
            elif t is Log:
                self.logs.append(eff)
            else:
                raise SimulationError(f"the scheduler emitted an unknown effect {eff!r:.200}")

    def _client_receives(self, client: str, msg: Any) -> None:
        msgs = self.client_msgs.get(client)
        if msgs is None:
            msgs = self.client_msgs[client] = {}
        msgs[msg.key] = msg
        if type(msg) is KeyCancelled:
            wants = self.wants.get(client)
            if wants is not None:
                wants.discard(msg.key)

    def _to_worker(self, w: SimWorker, *events: Any) -> None:
        if self.event_counts is not None:
            self._count(events, "worker")
        oracle = self.oracle
        if oracle is None:
            self._obey(w, w.core.handle(*events))
            return
        oracle.delivered(w.address, events, w.state.tasks)
        out = w.core.handle(*events)
        oracle.transfers_reported(w.address, events, out, w.state.tasks)
        self._obey(w, out)

    def _obey(self, w: SimWorker, out: list[Any]) -> None:
        """Carry out a worker core's instructions, as the worker shell does."""
        # Tested most frequent first (random graph, per task: ~2 ToScheduler, ~1.8 DeleteData,
        # one Execute, up to one GatherDep); Spill/Unspill only come with a memory limit.
        for ins in out:
            t = type(ins)
            if t is ToScheduler:
                q = self.queues.get((w.address, SCHEDULER))
                if q is None:
                    q = self.queues[(w.address, SCHEDULER)] = deque()
                q.append(ins.msg)
            elif t is DeleteData:
                w.data.pop(ins.key, None)
                w.disk.pop(ins.key, None)
                w.writing.pop(ins.key, None)  # a write in progress is dropped, unreported
            elif t is Execute:
                self._start(w, ins.key)
            elif t is GatherDep:
                if self.oracle is not None:
                    self.oracle.fetching(w.address, ins.peer, ins.keys)
                if ins.peer in w.gathers:
                    raise SimulationError(f"{w.address}: a second GatherDep to {ins.peer}")
                if not ins.keys:
                    raise SimulationError(f"{w.address}: an empty GatherDep to {ins.peer}")
                w.gathers[ins.peer] = list(ins.keys)
            elif t is Spill:
                if ins.key not in w.data:
                    raise SimulationError(f"{w.address}: Spill {ins.key!r}, not in memory")
                w.writing[ins.key] = w.data.pop(ins.key)  # written by finish_writes
            elif t is Unspill:
                key = ins.key
                v = w.writing.pop(key, None)  # still being written: back, write dropped
                if v is None:
                    if key not in w.disk:
                        raise SimulationError(f"{w.address}: Unspill {key!r}, not on disk")
                    v = w.disk.pop(key)
                w.data[key] = v
            else:
                raise SimulationError(f"{w.address}: unknown instruction {ins!r:.200}")

    def _start(self, w: SimWorker, key: Key) -> None:
        if key in w.running:
            raise SimulationError(f"{w.address}: Execute {key!r} while it still runs there")
        task = self.graph.get(key)
        if task is None:
            raise SimulationError(f"{w.address}: Execute {key!r}, which no client submitted")
        data = w.data
        inputs = []
        for dk in task.dependencies:
            v = data.get(dk)
            if v is None:
                raise SimulationError(
                    f"{w.address}: Execute {key!r} before its input {dk!r} is in memory there"
                )
            inputs.append(v)
        if self.oracle is not None:
            self.oracle.started(self, w.address, key)
        w.running[key] = SimRun(task_value(key, inputs), self.now, task)

    def _close(self, addr: str, reason: str) -> None:
        """The worker shuts down (the scheduler has already removed it)."""
        w = self.workers.pop(addr, None)
        if w is not None:
            self.departed.append(w)
            if self.oracle is not None:
                self._runs_ended(w, w.running)
            if reason != "retired":
                self.lost += 1  # removed for silence (no heartbeat): as good as lost
        self.queues.pop((SCHEDULER, addr), None)
        self.queues.pop((addr, SCHEDULER), None)

    # ------------------------------------------------------------------ cluster steps

    def add_worker(
        self,
        *,
        name: str | None = None,
        nthreads: int = 1,
        resources: dict[str, float] | None = None,
        memory_limit: int = 0,
        **worker_kwargs: Any,
    ) -> str:
        """Start a worker and register it with the scheduler; returns its address."""
        self._n_workers += 1
        addr = f"sim://w{self._n_workers}"
        self._spawn(addr, name, nthreads, resources, memory_limit, **worker_kwargs)
        return addr

    def _spawn(
        self,
        addr: str,
        name: str | None,
        nthreads: int,
        resources: dict[str, float] | None,
        memory_limit: int,
        **worker_kwargs: Any,
    ) -> None:
        res = dict(resources or {})
        kw = dict(
            nthreads=nthreads, resources=res, memory_limit=memory_limit,
            validate=self.validate, **worker_kwargs,
        )  # fmt: skip
        core: Any
        if self.record:
            core = Recorder.worker(addr, **kw)
            self.worker_logs[addr] = core.log
        else:
            core = WorkerState(addr, **kw)
        self.workers[addr] = SimWorker(addr, name, nthreads, res, memory_limit, core)
        sid, now = self._sid("add-worker")
        self._to_scheduler(AddWorker(sid, now, addr, nthreads, memory_limit, res, name))

    def reregister(self, addr: str) -> None:
        """The worker's process dies and a new one starts at the same address (a nanny
        restarting it on a fixed port) before the scheduler noticed: the scheduler learns
        of it only from the new process's ``AddWorker``. Nothing of the old one survives:
        its values, runs, transfers and the messages in both directions."""
        old = self.workers.pop(addr)
        self.departed.append(old)
        self.lost += 1
        if self.oracle is not None:
            self._runs_ended(old, old.running)
        self.queues.pop((SCHEDULER, addr), None)
        self.queues.pop((addr, SCHEDULER), None)
        self._spawn(
            addr, old.name, old.nthreads, old.resources, old.memory_limit,
            transfer_incoming_bytes_limit=old.state.transfer_incoming_bytes_limit,
        )  # fmt: skip

    def heartbeat(self, addr: str) -> None:
        """The worker's periodic heartbeat, queued behind its other messages."""
        sid, now = self._sid("heartbeat")
        q = self.queues.get((addr, SCHEDULER))
        if q is None:
            q = self.queues[(addr, SCHEDULER)] = deque()
        q.append(WorkerHeartbeat(sid, now, addr))

    def advance(self, seconds: float) -> None:
        """Time passes (a worker silent for longer than ``worker_timeout`` is removed at
        the scheduler's next ``Tick``)."""
        self.now += seconds

    def add_client(self, client: str) -> None:
        """A client connects (its handshake)."""
        self.wants.setdefault(client, set())
        sid, now = self._sid("add-client")
        self._to_scheduler(AddClient(sid, now, client))

    def scatter(
        self, client: str, key: Key, addrs: list[str], nbytes: int = 100, numbered: bool = True
    ) -> list[str]:
        """``client.scatter``: the value of ``key`` goes straight to the workers at
        ``addrs``, then the scheduler is told who holds it. A new key has no lineage; a
        key of a submitted task gets the value the graph gives it. A worker computing or
        fetching the key keeps its own copy and declines; returns the workers that took it.
        ``numbered=False``: the report names no data-update numbers (``UpdateData.seqs``
        ``None``, as from a holder whose reply had none)."""
        task = self.graph.get(key)
        if task is None:
            task = self.graph[key] = SimTask(key, [], nbytes, scattered=True)
        sts = self.scheduler.tasks.get(key)
        if sts is None or sts.run_spec is None:
            # a submitted key the scheduler forgot: it takes the data without lineage
            task.scattered = True
        value = self.expected(key)
        took = []
        seqs: dict[str, int] = {}
        for addr in addrs:
            w = self.workers[addr]
            wts = w.state.tasks.get(key)
            if wts is not None and wts.state not in ("released", "fetch", "missing", "memory"):
                continue
            if key in w.disk or key in w.writing:
                continue  # (a spilled copy: the shell would overwrite it; not modelled)
            w.data[key] = value
            sid, now = self._sid("scatter")
            self._to_worker(w, WorkerUpdateData(sid, now, {key: task.nbytes}))
            wts = w.state.tasks.get(key)
            if wts is not None and wts.state == "memory":  # (perhaps spilled at once)
                took.append(addr)
                seqs[addr] = w.state.scatter_seq  # the shell's reply to update_data
        if took:
            self.departed_before_scatter.setdefault(key, len(self.departed))
            self.wants.setdefault(client, set()).add(key)
            sid, now = self._sid("update-data")
            self._to_scheduler(
                UpdateData(
                    sid, now, client, {key: took}, {key: task.nbytes}, seqs if numbered else None
                )
            )
        return took

    def fail_spill(self, addr: str, key: Key) -> None:
        """Writing ``key``'s spill file fails (it cannot be pickled, or the disk is full):
        the value stays in RAM, for good."""
        w = self.workers[addr]
        w.data[key] = w.writing.pop(key)
        sid, now = self._sid("spill-failed")
        self._to_worker(w, SpillFailed(sid, now, key, "simulated"))

    def lose_worker(self, addr: str, *, flush: bool = False) -> None:
        """The worker dies. Messages to it are lost; its own unsent messages are lost too,
        unless ``flush`` (they were in the socket: the scheduler reads them before it sees
        the stream end). Its running tasks and transfers vanish."""
        w = self.workers.pop(addr)
        self.departed.append(w)
        self.lost += 1
        if self.oracle is not None:
            self._runs_ended(w, w.running)
        self.queues.pop((SCHEDULER, addr), None)
        sid, now = self._sid("worker-lost")
        ev = RemoveWorker(sid, now, addr, False, "simulated loss")
        if flush and self.queues.get((addr, SCHEDULER)):
            self.queues[(addr, SCHEDULER)].append(ev)
        else:
            self.queues.pop((addr, SCHEDULER), None)
            self._to_scheduler(ev)

    def retire_worker(self, addr: str) -> None:
        sid, now = self._sid("retire")
        self._to_scheduler(RetireWorker(sid, now, addr))

    def tick(self) -> None:
        """The scheduler's periodic tick: work stealing (and time-outs)."""
        sid, now = self._sid("tick")
        self._to_scheduler(Tick(sid, now))

    def measure_memory(self, addr: str, process_memory: int) -> None:
        """The worker's memory monitor reports ``process_memory`` bytes (spill, pause)."""
        w = self.workers[addr]
        w.process_memory = process_memory
        sid, now = self._sid("memory")
        self._to_worker(w, MemoryMeasured(sid, now, process_memory))

    def submit(self, client: str, tasks: list[SimTask], keys: list[Key]) -> None:
        """The client submits ``tasks`` and holds futures for ``keys``."""
        specs = []
        graph = self.graph
        for i, t in enumerate(tasks):
            old = graph.get(t.key)
            if old is None:
                graph[t.key] = t
                if t.fail_attempts:
                    self.fails_left[t.key] = t.fail_attempts
                if t.workers:
                    self.required_names.update(t.workers)
                if t.resources:
                    for r, q in t.resources.items():
                        self.needs_resources[r] = max(self.needs_resources.get(r, 0.0), q)
            elif old.dependencies != t.dependencies:
                raise ValueError(f"key {t.key!r} resubmitted with other dependencies")
            specs.append(
                TaskSpec(
                    t.key, list(t.dependencies), RUN_SPEC, t.priority, i, t.workers,
                    t.allow_other_workers, t.resources, t.retries,
                )
            )  # fmt: skip
        self.wants.setdefault(client, set()).update(keys)
        sid, now = self._sid("update-graph")
        self._to_scheduler(UpdateGraph(sid, now, client, specs, list(keys)))

    def desire(self, client: str, keys: list[Key]) -> None:
        """The client takes futures for keys (perhaps submitted by another client)."""
        self.wants.setdefault(client, set()).update(keys)
        sid, now = self._sid("desire")
        self._to_scheduler(ClientDesiresKeys(sid, now, client, list(keys)))

    def release(self, client: str, keys: list[Key]) -> None:
        """The client dropped its futures for ``keys``."""
        self.wants.get(client, set()).difference_update(keys)
        sid, now = self._sid("release")
        self._to_scheduler(ClientReleasesKeys(sid, now, client, list(keys)))

    def cancel(self, client: str, keys: list[Key], force: bool = False) -> None:
        """``client.cancel(futures)``: wants end as the scheduler sends ``KeyCancelled``."""
        sid, now = self._sid("cancel")
        self._to_scheduler(CancelKeys(sid, now, client, list(keys), force))

    def retry(self, client: str, keys: list[Key]) -> None:
        """``client.retry(futures)``: erred keys (and erred dependencies) run again."""
        tasks = self.scheduler.tasks
        erred = {k for k, ts in tasks.items() if ts.state == "erred"} if self.oracle else set()
        sid, now = self._sid("retry")
        self._to_scheduler(RetryKeys(sid, now, client, list(keys)))
        if self.oracle is not None:
            self.oracle.retried(k for k in erred if k not in tasks or tasks[k].state != "erred")
            self.oracle.check_retry(self.scheduler, sid, [k for k in keys if k in erred])

    def fire_and_forget(self, keys: list[Key]) -> None:
        """``fire_and_forget(futures)``: the scheduler's own client wants ``keys`` until
        each has an outcome (then the core releases it; ``check_outcome`` says if not)."""
        sid, now = self._sid("fire-and-forget")
        if FIRE_AND_FORGET not in self.scheduler.clients:  # the shell adds it at start
            self._to_scheduler(AddClient(sid, now, FIRE_AND_FORGET))
        self._to_scheduler(ClientDesiresKeys(sid, now, FIRE_AND_FORGET, list(keys)))

    def restart_clients(self, requester: str) -> None:
        """``Client.restart``'s cancellation: every want ends; the requester drops its
        own futures, the others as ``KeyCancelled`` arrives."""
        self.wants.get(requester, set()).clear()
        sid, now = self._sid("restart")
        self._to_scheduler(CancelAll(sid, now, requester, "restarted"))

    def remove_client(self, client: str) -> None:
        self.wants.pop(client, None)
        sid, now = self._sid("remove-client")
        self._to_scheduler(RemoveClient(sid, now, client))

    # ------------------------------------------------------------------ message and work steps

    def nonempty_queues(self) -> list[tuple[str, str]]:
        return [pair for pair, q in self.queues.items() if q]

    def running_tasks(self) -> list[tuple[str, Key]]:
        return [(a, k) for a, w in self.workers.items() for k in w.running]

    def pending_gathers(self) -> list[tuple[str, str]]:
        return [(a, p) for a, w in self.workers.items() for p in w.gathers]

    def pending_writes(self) -> list[str]:
        """Workers with spill files being written."""
        return [a for a, w in self.workers.items() if w.writing]

    def deliver(self, src: str, dst: str, n: int = 1) -> None:
        """Deliver the next ``n`` messages (at most) from ``src`` to ``dst``, as one batch."""
        q = self.queues.get((src, dst))
        if not q:
            return  # a stream that closed meanwhile (its worker retired or died)
        batch = [q.popleft() for _ in range(min(n, len(q)))]
        if dst == SCHEDULER:
            self._to_scheduler(*batch)
        else:
            self._to_worker(self.workers[dst], *batch)

    def _outcome(self, w: SimWorker, key: Key) -> Any:
        """End the run of ``key`` on ``w``: the event its shell would feed the core."""
        run = w.running.pop(key)
        sid, now = self._sid("execute")
        left = self.fails_left.get(key)
        if left:
            if left != ALWAYS:
                self.fails_left[key] = left - 1
            exc = SimulatedFailure(key)
            return ExecuteFailure(
                sid, now, key, pickle.dumps(exc), b"", f"SimulatedFailure({key!r})", "",
                run.start, now,
            )  # fmt: skip
        w.data[key] = run.value  # the shell stores the value before telling the core
        task = run.task
        return ExecuteSuccess(
            sid, now, key, task.nbytes, "int", run.start, run.start + task.duration
        )

    def finish(self, addr: str, key: Key) -> None:
        """The running task ends: it succeeds, unless it was built to fail this time."""
        w = self.workers[addr]
        self._to_worker(w, self._outcome(w, key))
        if self.oracle is not None:
            self._runs_ended(w, [key])

    def _runs_ended(self, w: SimWorker, keys: Iterable[Key]) -> None:
        assert self.oracle is not None
        tasks = w.state.tasks if w.address in self.workers else {}
        for key in keys:
            ts = tasks.get(key)
            self.oracle.ended(key, ts is not None and ts.state == "memory")

    def secede(self, addr: str, key: Key) -> None:
        """The running task calls ``secede()`` (once)."""
        w = self.workers[addr]
        run = w.running[key]
        if run.seceded:
            return
        run.seceded = True
        sid, now = self._sid("secede")
        self._to_worker(w, SecedeEvent(sid, now, key, 0.0))

    def reschedule(self, addr: str, key: Key) -> None:
        """The running task raises ``Reschedule``: it ends without a result."""
        w = self.workers[addr]
        del w.running[key]
        sid, now = self._sid("reschedule")
        self._to_worker(w, RescheduleEvent(sid, now, key))
        if self.oracle is not None:
            self.oracle.ended(key, False)

    def _gather_event(self, w: SimWorker, peer: str, fail: bool) -> Any:
        keys = w.gathers.pop(peer)
        sid, now = self._sid("gather")
        pw = self.workers.get(peer)
        if fail or pw is None:
            return GatherDepFailure(sid, now, peer, keys, "simulated" if fail else "peer gone")
        seq = pw.state.scatter_seq  # (as the shell's get_data reads it, before looking)
        got: dict[Key, int] = {}
        missing: list[Key] = []
        data, peer_data, peer_disk, graph = w.data, pw.data, pw.disk, self.graph
        peer_writing = pw.writing
        for k in keys:
            v = peer_data.get(k)
            if v is None:
                v = peer_disk.get(k)
            if v is None:
                v = peer_writing.get(k)
            if v is None:
                missing.append(k)
            else:
                data[k] = v
                got[k] = graph[k].nbytes
        return GatherDepSuccess(sid, now, peer, got, missing, [], seq)

    def _writes_event(self, w: SimWorker, n: int | None) -> Any:
        writing = w.writing
        keys = list(writing) if n is None or n >= len(writing) else list(writing)[:n]
        disk = w.disk
        for k in keys:
            disk[k] = writing.pop(k)
        sid, now = self._sid("spill-written")
        return SpillWritten(sid, now, keys)

    def finish_writes(self, addr: str, n: int | None = None) -> None:
        """The worker's spill writer completes its ``n`` oldest writes (all by default)
        and reports them (``SpillWritten``)."""
        w = self.workers[addr]
        if w.writing:
            self._to_worker(w, self._writes_event(w, n))

    def gather(self, addr: str, peer: str, *, fail: bool = False) -> None:
        """The transfer from ``peer`` ends: the keys the peer holds arrive (all fail with
        ``fail`` or when the peer is gone)."""
        w = self.workers[addr]
        self._to_worker(w, self._gather_event(w, peer, fail))

    # ------------------------------------------------------------------ driving to the end

    def stop_faults(self) -> None:
        """Unpause every worker and make sure every restriction can be met again."""
        for addr, w in list(self.workers.items()):
            if w.process_memory:
                self.measure_memory(addr, 0)
        retiring = self.scheduler.retiring  # these will close: they do not count
        staying = [w for a, w in self.workers.items() if a not in retiring]
        live_names = {w.name for w in staying}
        for name in sorted(self.required_names - live_names):
            self.add_worker(name=name, resources=dict(self.needs_resources))
        if self.needs_resources and not any(
            all(w.resources.get(r, 0.0) >= q for r, q in self.needs_resources.items())
            for w in staying
        ):
            self.add_worker(resources=dict(self.needs_resources))
        if not staying:
            self.add_worker()

    def run_to_completion(self, max_rounds: int = 100_000) -> int:
        """Deliver every message, finish every task and transfer until nothing is left.

        Each round delivers every queue as one batch (as the shells' batched streams do),
        then ends every running task and every transfer and completes every spill write. Returns the number of rounds;
        raises ``SimulationError`` if work remains after ``max_rounds``.
        """
        queues = self.queues
        workers = self.workers
        for rounds in range(max_rounds):
            busy = False
            for pair, q in list(queues.items()):
                if not q or queues.get(pair) is not q:
                    continue  # empty, or its worker closed during this round
                dst = pair[1]
                busy = True
                batch = tuple(q)  # a tuple passes through handle(*batch) without a copy
                q.clear()
                # handle() and routing called directly, not through _to_scheduler and
                # _to_worker: one call less per batch in the benchmark's only loop
                if dst == SCHEDULER:
                    self._route_effects(self._scheduler_handle(batch))
                else:
                    w = workers.get(dst)
                    if w is not None:
                        if self.event_counts is not None:
                            self._count(batch, "worker")
                        if self.oracle is not None:
                            self.oracle.delivered(dst, batch, w.state.tasks)
                        self._obey(w, w.core.handle(*batch))
            for w in list(workers.values()):
                if w.address not in workers:
                    continue
                if w.running:
                    busy = True
                    ended = list(w.running)
                    events = [self._outcome(w, k) for k in ended]
                    self._to_worker(w, *events)
                    if self.oracle is not None:
                        self._runs_ended(w, ended)
                if w.gathers:
                    busy = True
                    events = [self._gather_event(w, p, False) for p in list(w.gathers)]
                    self._to_worker(w, *events)
                if w.writing:
                    busy = True
                    self._to_worker(w, self._writes_event(w, None))
            if not busy:
                return rounds
        raise SimulationError(f"the cluster did not settle in {max_rounds} rounds")

    # ------------------------------------------------------------------ checks

    def check(self) -> None:
        """Every core's invariants, and that each worker shell agrees with its core."""
        check_shells(self)

    def expected(self, key: Key) -> int:
        """The value ``key`` must have: the graph evaluated directly."""
        return expected_value(self.graph, self._values, key)

    def lineage(self, key: Key) -> set[Key]:
        """``key`` and everything it depends on, transitively."""
        return lineage(self.graph, key)

    def failure_flags(self) -> dict[Key, tuple[bool, bool]]:
        """``key -> (doomed, may_fail)``: see ``sim_graphs.failure_flags``."""
        return failure_flags(self.graph)

    _failure_flags = failure_flags  # the name the machine's rules use

    def check_outcome(self) -> list[str]:
        """After ``run_to_completion``: what is wrong with the result (empty if nothing);
        see ``sim_outcome.check_outcome``."""
        return check_outcome(self)

    def settle(self, max_rounds: int = 100_000) -> list[str]:
        """Stop faults, run to completion, check everything; returns the problems."""
        self.stop_faults()
        self.run_to_completion(max_rounds)
        self.check()
        return self.check_outcome()

