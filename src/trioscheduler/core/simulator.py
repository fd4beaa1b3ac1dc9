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
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from trioscheduler.core.errors import KilledWorker
from trioscheduler.core.invariants import validate
from trioscheduler.core.messages import (
    AddClient,
    AddWorker,
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
    KeyErred,
    KeyInMemory,
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
from trioscheduler.core.sim_oracle import RunOracle, removes_workers
from trioscheduler.core.worker import WorkerState
from trioscheduler.core.worker_transitions import RUNNING_STATES
from trioscheduler.errors import TrioSchedulerError

SCHEDULER = "scheduler"
"""The scheduler's name as a queue endpoint."""
ALWAYS = 1 << 30
"""``SimTask.fail_attempts`` for a task that never succeeds."""
RUN_SPEC = b"sim"
"""The opaque run spec of every simulated task (the simulator keeps the real graph)."""
_MASK = (1 << 61) - 1

SchedulerEndpoint = Callable[..., list[Any]]


class Rng(Protocol):
    """What the graph builders need of an injected ``random.Random``."""

    def sample(self, population: list[Any], k: int) -> list[Any]: ...


class SimulationError(AssertionError):
    """A core broke its contract with the shell, or the cluster did not settle."""


class SimulatedFailure(Exception):
    """The exception a simulated task raises (pickled into ``ExecuteFailure``)."""

    def __init__(self, key: Any) -> None:
        super().__init__(key)
        self.key = key


@dataclass(slots=True, eq=False)
class SimTask:
    """One task of a simulated graph; its value is ``task_value(key, input values)``.

    ``fail_attempts``: how many executions fail before one succeeds (``ALWAYS``: never).
    """

    key: Key
    dependencies: list[Key] = field(default_factory=list)
    nbytes: int = 100
    fail_attempts: int = 0
    retries: int = 0
    workers: list[str] | None = None
    allow_other_workers: bool = False
    resources: dict[str, float] | None = None
    priority: int = 0
    duration: float = 0.01
    scattered: bool = False  # data a client scattered: no lineage to recompute it from


@dataclass(slots=True, eq=False)
class _Run:
    value: int
    start: float
    task: SimTask  # kept so that ending the run needs no second look-up in the graph
    seceded: bool = False


@dataclass(slots=True, eq=False)
class SimWorker:
    """One worker: its core and what its shell holds (values, threads, transfers)."""

    address: str
    name: str | None
    nthreads: int
    resources: dict[str, float]
    memory_limit: int
    core: Any  # WorkerState or Recorder
    data: dict[Key, int] = field(default_factory=dict)  # values in RAM
    disk: dict[Key, int] = field(default_factory=dict)  # spilled values, written
    writing: dict[Key, int] = field(default_factory=dict)  # spilled, write not yet reported
    running: dict[Key, _Run] = field(default_factory=dict)  # Execute received, not ended
    gathers: dict[str, list[Key]] = field(default_factory=dict)  # peer -> keys in flight
    process_memory: int = 0

    @property
    def state(self) -> WorkerState:
        core = self.core
        return core.state if type(core) is Recorder else core  # type: ignore[no-any-return]


def task_value(key: Key, inputs: Iterable[int]) -> int:
    """The deterministic value of a simulated task (stable across processes)."""
    v = zlib.crc32(repr(key).encode())
    for x in inputs:
        v = ((v * 1_000_003) ^ x) & _MASK
    return v


def _holds_thread(ts: Any) -> bool:
    st = ts.state
    return st in RUNNING_STATES or (
        (st == "cancelled" or st == "resumed") and ts.previous in RUNNING_STATES
    )


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
        if self.oracle is not None:
            self.oracle.delivered(w.address, events)
        self._obey(w, w.core.handle(*events))

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
        w.running[key] = _Run(task_value(key, inputs), self.now, task)

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
        self._spawn(addr, old.name, old.nthreads, old.resources, old.memory_limit)

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

    def scatter(self, client: str, key: Key, addrs: list[str], nbytes: int = 100) -> list[str]:
        """``client.scatter``: the value of ``key`` goes straight to the workers at
        ``addrs``, then the scheduler is told who holds it. A new key has no lineage; a
        key of a submitted task gets the value the graph gives it. A worker computing or
        fetching the key keeps its own copy and declines; returns the workers that took it."""
        task = self.graph.get(key)
        if task is None:
            task = self.graph[key] = SimTask(key, [], nbytes, scattered=True)
        sts = self.scheduler.tasks.get(key)
        if sts is None or sts.run_spec is None:
            # a submitted key the scheduler forgot: it takes the data without lineage
            task.scattered = True
        value = self.expected(key)
        took = []
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
        if took:
            self.wants.setdefault(client, set()).add(key)
            sid, now = self._sid("update-data")
            self._to_scheduler(UpdateData(sid, now, client, {key: took}, {key: task.nbytes}))
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
        erred = [k for k, ts in tasks.items() if ts.state == "erred"] if self.oracle else []
        sid, now = self._sid("retry")
        self._to_scheduler(RetryKeys(sid, now, client, list(keys)))
        if self.oracle is not None:
            self.oracle.retried(k for k in erred if k not in tasks or tasks[k].state != "erred")

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
        return GatherDepSuccess(sid, now, peer, got, missing)

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
                            self.oracle.delivered(dst, batch)
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
        validate(self.scheduler)
        for addr, w in self.workers.items():
            ws = w.state
            validate(ws)
            if w.data.keys() != ws.in_memory:
                raise SimulationError(
                    f"{addr}: shell holds {sorted(w.data, key=repr)} in RAM, "
                    f"core says {sorted(ws.in_memory, key=repr)}"
                )
            if w.writing.keys() != ws.writing.keys():
                raise SimulationError(
                    f"{addr}: shell writes {sorted(w.writing, key=repr)} to disk, "
                    f"core waits for {sorted(ws.writing, key=repr)}"
                )
            if w.disk.keys() | w.writing.keys() != ws.spilled:
                raise SimulationError(
                    f"{addr}: shell holds {sorted(w.disk, key=repr)} on disk "
                    f"(and writes {sorted(w.writing, key=repr)}), "
                    f"core says {sorted(ws.spilled, key=repr)}"
                )
            threads = {k for k, ts in ws.tasks.items() if _holds_thread(ts)}
            if w.running.keys() != threads:
                raise SimulationError(
                    f"{addr}: shell runs {sorted(w.running, key=repr)}, "
                    f"core has threads for {sorted(threads, key=repr)}"
                )
            flights = {p: {t.key for t in b} for p, b in ws.in_flight.items()}
            if {p: set(ks) for p, ks in w.gathers.items()} != flights:
                raise SimulationError(f"{addr}: shell fetches {w.gathers}, core {flights}")
        if self.oracle is not None:
            self.oracle.check(self)

    def expected(self, key: Key) -> int:
        """The value ``key`` must have: the graph evaluated directly."""
        values = self._values
        v = values.get(key)
        if v is not None:
            return v
        graph = self.graph
        stack = [key]
        while stack:
            k = stack[-1]
            if k in values:
                stack.pop()
                continue
            todo = [d for d in graph[k].dependencies if d not in values]
            if todo:
                stack.extend(todo)
                continue
            stack.pop()
            values[k] = task_value(k, [values[d] for d in graph[k].dependencies])
        return values[key]

    def lineage(self, key: Key) -> set[Key]:
        """``key`` and everything it depends on, transitively."""
        seen = {key}
        stack = [key]
        graph = self.graph
        while stack:
            for d in graph[stack.pop()].dependencies:
                if d not in seen:
                    seen.add(d)
                    stack.append(d)
        return seen

    def _failure_flags(self) -> dict[Key, tuple[bool, bool]]:
        """``key -> (doomed, may_fail)`` over its lineage: a task that always fails, a
        task that may fail more often than its retries allow (graph order is
        topological: dependencies are submitted first)."""
        flags: dict[Key, tuple[bool, bool]] = {}
        for k, t in self.graph.items():
            doomed = t.fail_attempts == ALWAYS
            may_fail = t.fail_attempts > t.retries
            for d in t.dependencies:
                dd, dm = flags[d]
                doomed = doomed or dd
                may_fail = may_fail or dm
            flags[k] = (doomed, may_fail)
        return flags

    def check_outcome(self) -> list[str]:
        """After ``run_to_completion``: what is wrong with the result (empty if nothing).

        Liveness: no task is left computing anywhere. Correctness: every key a client
        still wants is in memory with the value the graph gives it, on every holder, and
        the client was told; or it erred, and the graph asked for that (a task built to
        fail in its lineage) or a worker was lost (``KilledWorker``).
        """
        problems: list[str] = []
        s = self.scheduler
        flags = self._failure_flags()
        stuck = {
            k: ts.state
            for k, ts in s.tasks.items()
            if ts.state not in ("memory", "erred", "released")
        }
        if stuck:
            problems.append(f"scheduler tasks still not done: {dict(list(stuck.items())[:10])}")
        for addr, w in self.workers.items():
            ws = w.state
            busy = {
                k: ts.state for k, ts in ws.tasks.items() if ts.state not in ("memory", "error")
            }
            if busy:
                problems.append(f"{addr}: tasks still not done: {dict(list(busy.items())[:10])}")
            sws = s.workers.get(addr)
            if sws is not None and sws.status == "closing":
                problems.append(f"{addr}: still retiring (status closing) after everything settled")
            for k in ws.in_memory | ws.spilled:
                sts = s.tasks.get(k)
                if sts is None or sts.state != "memory" or addr not in sts.who_has:
                    problems.append(f"{addr} holds {k!r}, which the scheduler does not count")
        for k, ts in s.tasks.items():
            for addr in ts.who_has:
                holder = self.workers.get(addr)
                if holder is None or not (
                    k in holder.data or k in holder.disk or k in holder.writing
                ):
                    problems.append(f"scheduler thinks {addr} holds {k!r}; it does not")
        for client, wants in self.wants.items():
            cs = s.clients.get(client)
            have = set(cs.wants) if cs is not None else set()
            if have != wants:
                problems.append(
                    f"client {client} wants {sorted(wants, key=repr)}, "
                    f"scheduler says {sorted(have, key=repr)}"
                )
            msgs = self.client_msgs.get(client, {})
            for key in wants:
                problems.extend(self._check_key(client, key, msgs.get(key), flags))
        return problems

    def _check_key(
        self, client: str, key: Key, last: Any, flags: dict[Key, tuple[bool, bool]]
    ) -> list[str]:
        ts = self.scheduler.tasks.get(key)
        if ts is None:
            return [f"{client} wants {key!r}, which the scheduler forgot"]
        graph = self.graph
        doomed, may_fail = flags[key]
        if ts.state == "memory":
            out = []
            if doomed:
                out.append(f"{key!r} in memory, though a task of its lineage always fails")
            want = self.expected(key)
            for addr in ts.who_has:
                w = self.workers[addr]
                got = w.data.get(key, w.disk.get(key, w.writing.get(key)))
                if got != want:
                    out.append(f"{key!r} on {addr} is {got}, expected {want}")
            if type(last) is not KeyInMemory:
                out.append(f"{client} was not told {key!r} is in memory (last: {last!r:.100})")
            return out
        if ts.state != "erred":
            return [f"{client} wants {key!r}, left in state {ts.state}"]
        out = []
        if type(last) is not KeyErred:
            out.append(f"{client} was not told {key!r} erred (last: {last!r:.100})")
        try:
            exc = pickle.loads(ts.exception or b"")
        except Exception as e:  # noqa: BLE001 - any garbage is a finding
            return [*out, f"{key!r} erred with an unreadable exception: {e!r}"]
        if isinstance(exc, SimulatedFailure):
            if exc.key not in self.lineage(key) or not graph[exc.key].fail_attempts:
                out.append(f"{key!r} erred blaming {exc.key!r}, not a failing task of its lineage")
            elif not may_fail:
                out.append(f"{key!r} erred though every failure was within its retries")
        elif isinstance(exc, KilledWorker):
            if not self.lost:
                out.append(f"{key!r} erred with KilledWorker, but no worker was lost")
        elif isinstance(exc, TrioSchedulerError) and "Scatter it again" in str(exc):
            # scattered data lost (or freed while a scatter of it raced the FreeKeys)
            if not any(graph[k].scattered for k in self.lineage(key)):
                out.append(f"{key!r} erred as lost scattered data, but none is in its lineage")
        else:
            out.append(f"{key!r} erred with an unexpected {exc!r}")
        return out

    def settle(self, max_rounds: int = 100_000) -> list[str]:
        """Stop faults, run to completion, check everything; returns the problems."""
        self.stop_faults()
        self.run_to_completion(max_rounds)
        self.check()
        return self.check_outcome()


# ------------------------------------------------------------------------------ graphs


def layered_graph(
    n_tasks: int,
    width: int,
    rng: Rng,
    *,
    fan_in: int = 2,
    prefix: str = "t",
    nbytes: int = 1000,
) -> list[SimTask]:
    """``n_tasks`` in layers of ``width``; each task past the first layer reads
    ``fan_in`` random tasks of the layer before (so data moves between workers)."""
    tasks: list[SimTask] = []
    prev: list[Key] = []
    layer = 0
    while len(tasks) < n_tasks:
        cur: list[Key] = []
        for i in range(min(width, n_tasks - len(tasks))):
            key = f"{prefix}{layer}-{i}"
            deps = rng.sample(prev, min(fan_in, len(prev))) if prev else []
            tasks.append(SimTask(key, deps, nbytes))
            cur.append(key)
        prev = cur
        layer += 1
    return tasks


def independent_graph(n_tasks: int, *, prefix: str = "m", nbytes: int = 1000) -> list[SimTask]:
    """``n_tasks`` tasks without dependencies (a ``map``)."""
    return [SimTask(f"{prefix}-{i}", [], nbytes) for i in range(n_tasks)]


def tree_graph(
    n_tasks: int, *, fan_in: int = 2, prefix: str = "r", nbytes: int = 1000
) -> list[SimTask]:
    """A reduction tree of about ``n_tasks`` tasks: leaves, then each task combines
    ``fan_in`` neighbours of the level below (dask's tree reduction)."""
    n_leaves = max(1, n_tasks * (fan_in - 1) // fan_in)
    tasks = [SimTask(f"{prefix}0-{i}", [], nbytes) for i in range(n_leaves)]
    level = [t.key for t in tasks]
    depth = 0
    while len(level) > 1 and len(tasks) < n_tasks:
        depth += 1
        nxt: list[Key] = []
        for i in range(0, len(level), fan_in):
            key = f"{prefix}{depth}-{i // fan_in}"
            tasks.append(SimTask(key, level[i : i + fan_in], nbytes))
            nxt.append(key)
        level = nxt
    return tasks


def sinks(tasks: list[SimTask]) -> list[Key]:
    """Keys no task of ``tasks`` depends on (what a client usually holds futures for)."""
    used = {d for t in tasks for d in t.dependencies}
    return [t.key for t in tasks if t.key not in used]
