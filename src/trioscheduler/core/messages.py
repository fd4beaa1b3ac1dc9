"""Every value that crosses the core's boundary: events in, effects/instructions out.

One vocabulary serves three jobs, so it lives in one place:

* the **scheduler core** consumes ``SchedulerEvent``s and emits ``SchedulerEffect``s;
* the **worker core** consumes ``WorkerEvent``s and emits ``WorkerInstruction``s;
* the **wire** between the shells carries the same objects: a ``ToWorker`` effect's
  ``msg`` is a ``WorkerEvent`` the worker shell hands to its core unchanged, and a
  ``ToScheduler`` instruction's ``msg`` is a ``SchedulerEvent``. The hypothesis
  simulator in ``tests/property`` does exactly what the shells do, minus sockets.

Every type is a slotted dataclass registered under a short string tag.
``dump(obj)`` turns one into ``[tag, field, ...]`` of msgpack-native values (nested
registered records recurse), and ``load`` reverses it; the recorder and the wire both use
this pair (defined in ``records``, re-exported here). Opaque payloads (pickled run specs,
pickled exceptions) are ``bytes``: the scheduler never unpickles user code.

Conventions: every event carries ``stimulus_id`` (why it happened, for stories) and
``now`` (seconds, from the shell's clock; the core never reads a clock). Keys are opaque
hashables: ``str``, ``bytes``, ``int``, ``float`` or tuples of those (dask's keys).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import field
from typing import Any, Final

from trioscheduler.core.records import _FIELDS as _FIELDS
from trioscheduler.core.records import _NESTED as _NESTED
from trioscheduler.core.records import _REGISTRY as _REGISTRY
from trioscheduler.core.records import MessageError as MessageError
from trioscheduler.core.records import dump as dump
from trioscheduler.core.records import load as load
from trioscheduler.core.records import message

Key = Any  # str | bytes | int | float | tuple[Key, ...]: anything hashable dask uses as a key

FIRE_AND_FORGET: Final = "fire-and-forget"
"""The client id that wants ``fire_and_forget`` keys: the scheduler's own, never removed."""
WorkerAddr = str
ClientId = str

# --------------------------------------------------------------------------------------
# Records carried inside events
# --------------------------------------------------------------------------------------


@message("task-spec")
class TaskSpec:
    """One task of a graph submitted by a client.

    ``run_spec`` is the pickled callable-with-arguments (opaque to the scheduler), or
    ``None`` for a task whose data will be provided (scattered). ``priority`` is the
    user priority (higher runs first, as in dask); ``order`` is the graph order from
    ``dask.order`` (lower runs first). ``workers`` restricts placement to those addresses
    or names; ``allow_other_workers`` makes it a preference; ``resources`` like
    ``{"GPU": 1}`` must be available on the worker.
    """

    key: Key
    dependencies: Sequence[Key]
    run_spec: Any  # bytes, or bytes with out-of-band buffers (wire.runspec); None
    priority: int = 0
    order: int = 0
    workers: Sequence[str] | None = None
    allow_other_workers: bool = False
    resources: dict[str, float] | None = None
    retries: int = 0


# --------------------------------------------------------------------------------------
# Scheduler events: from clients
# --------------------------------------------------------------------------------------


@message("add-client")
class AddClient:
    stimulus_id: str
    now: float
    client: ClientId


@message("remove-client")
class RemoveClient:
    """The client disconnected: every key it wanted loses that want."""

    stimulus_id: str
    now: float
    client: ClientId


@message("update-graph")
class UpdateGraph:
    """New tasks; the client wants ``keys`` (it holds futures for them)."""

    stimulus_id: str
    now: float
    client: ClientId
    tasks: Sequence[TaskSpec]
    keys: Sequence[Key]


@message("update-data")
class UpdateData:
    """A client scattered data straight to workers: ``who_has`` holders, ``nbytes`` sizes;
    ``seqs``: each holder's number for that data update (``WorkerState.scatter_seq``),
    which the scheduler's later ``FreeKeys`` of those keys there carry back.
    ``incarnations``: each holder's ``AddWorker.incarnation`` as its reply named it; a
    holder registered since under another one (a new process at the same address) does
    not have the data and is not counted."""

    stimulus_id: str
    now: float
    client: ClientId
    who_has: dict[Key, Sequence[WorkerAddr]]
    nbytes: dict[Key, int]
    seqs: dict[WorkerAddr, int] | None = None
    incarnations: dict[WorkerAddr, str] | None = None


@message("client-desires-keys")
class ClientDesiresKeys:
    stimulus_id: str
    now: float
    client: ClientId
    keys: Sequence[Key]


@message("client-releases-keys")
class ClientReleasesKeys:
    stimulus_id: str
    now: float
    client: ClientId
    keys: Sequence[Key]


@message("cancel-keys")
class CancelKeys:
    """Cancel ``keys`` for ``client`` (with ``force``: for every client, and dependents)."""

    stimulus_id: str
    now: float
    client: ClientId
    keys: Sequence[Key]
    force: bool = False


@message("cancel-all")
class CancelAll:
    """``Client.restart``: every client's wanted keys are cancelled (each is told why,
    except ``client``, the requester, which cancels its own futures) and released."""

    stimulus_id: str
    now: float
    client: ClientId
    reason: str


@message("retry-keys")
class RetryKeys:
    """Erred ``keys`` (and their erred dependencies) go back to waiting."""

    stimulus_id: str
    now: float
    client: ClientId
    keys: Sequence[Key]


# --------------------------------------------------------------------------------------
# Scheduler events: from workers (or their nannies) and from the scheduler's own clock
# --------------------------------------------------------------------------------------


@message("add-worker")
class AddWorker:
    """A worker joined; ``data`` are keys it already holds (``key -> nbytes``).
    ``incarnation`` names the worker's run (a process's ``Worker``), the same when it
    joins again: a scatter's report names it too (``UpdateData.incarnations``)."""

    stimulus_id: str
    now: float
    worker: WorkerAddr
    nthreads: int
    memory_limit: int = 0
    resources: dict[str, float] = field(default_factory=dict)
    name: str | None = None
    nanny: str | None = None
    data: dict[Key, int] = field(default_factory=dict)
    incarnation: str | None = None


@message("remove-worker")
class RemoveWorker:
    """A worker is gone. ``expected`` is False when it was lost (crash, time-out, kill)."""

    stimulus_id: str
    now: float
    worker: WorkerAddr
    expected: bool = False
    reason: str = ""


@message("retire-worker")
class RetireWorker:
    """Graceful retirement: copy its unique data elsewhere, then close it."""

    stimulus_id: str
    now: float
    worker: WorkerAddr


@message("drop-replicas")
class DropReplicas:
    """Drop ``worker``'s copies of ``keys`` where another copy remains (``rebalance``):
    the shell's plan, recorded so that a replay drops the same."""

    stimulus_id: str
    now: float
    worker: WorkerAddr
    keys: list[Key]


@message("active-memory-manager")
class ActiveMemoryManager:
    """``client.amm``: ``action`` is ``"start"`` (run ReduceReplicas at every ``Tick``
    ``interval`` seconds after the last run), ``"stop"`` or ``"run_once"`` (now)."""

    stimulus_id: str
    now: float
    action: str
    interval: float = 2.0


@message("heartbeat")
class WorkerHeartbeat:
    stimulus_id: str
    now: float
    worker: WorkerAddr
    metrics: dict[str, Any] = field(default_factory=dict)


@message("worker-status")
class WorkerStatusChange:
    """The worker paused (memory) or resumed; ``status`` is ``"running"`` or ``"paused"``."""

    stimulus_id: str
    now: float
    worker: WorkerAddr
    status: str


@message("task-finished")
class TaskFinished:
    stimulus_id: str
    now: float
    worker: WorkerAddr
    key: Key
    nbytes: int
    type_name: str = ""
    start: float = 0.0
    stop: float = 0.0
    run_id: int = 0  # the ComputeTask's (0: not an answer to one, e.g. a shell's report)


@message("task-erred")
class TaskErred:
    """``exception``/``traceback`` are pickled blobs for the client; ``*_text`` for humans."""

    stimulus_id: str
    now: float
    worker: WorkerAddr
    key: Key
    exception: bytes
    traceback: bytes
    exception_text: str = ""
    traceback_text: str = ""
    start: float = 0.0
    stop: float = 0.0
    run_id: int = 0  # the ComputeTask's (0: not an answer to one, e.g. a shell's report)


@message("add-keys")
class AddKeys:
    """The worker now holds replicas of ``keys`` (fetched from a peer): ``key -> nbytes``."""

    stimulus_id: str
    now: float
    worker: WorkerAddr
    keys: dict[Key, int]


@message("release-worker-data")
class ReleaseWorkerData:
    """The worker dropped its replicas of ``keys``. ``seq``: the data updates (scatters)
    it had taken when it said so; a copy that came by a later one is not dropped (the
    report went slower than the scatter). ``None``: not numbered (a drop of any copy)."""

    stimulus_id: str
    now: float
    worker: WorkerAddr
    keys: Sequence[Key]
    seq: int | None = None


@message("missing-data")
class MissingData:
    """``worker`` could not get ``key`` from ``errant_worker`` (it did not have it).
    ``errant_seq``: the errant worker's count of data updates when it answered
    (``WorkerState.scatter_seq``); a copy the scheduler counts there by a later scatter
    is not this report's to drop (``None``: unknown, the claim stands)."""

    stimulus_id: str
    now: float
    worker: WorkerAddr
    key: Key
    errant_worker: WorkerAddr
    errant_seq: int | None = None


@message("long-running")
class LongRunning:
    """The task seceded from the worker's thread pool; its thread slot is free."""

    stimulus_id: str
    now: float
    worker: WorkerAddr
    key: Key
    compute_duration: float = 0.0


@message("reschedule")
class Reschedule:
    """The worker gave the task back (it raised ``Reschedule``, or cannot run it)."""

    stimulus_id: str
    now: float
    worker: WorkerAddr
    key: Key


@message("steal-response")
class StealResponse:
    """Answer to ``StealRequest``: ``state`` the task had on the victim (None if unknown).

    If the scheduler still expects this answer: ``waiting``/``ready``/``constrained``
    (queued, now dropped) moves the task to the thief; a running or finished task stays;
    any other state (``released``, None, a transfer) places the task again.
    """

    stimulus_id: str
    now: float
    worker: WorkerAddr
    key: Key
    state: str | None


@message("tick")
class Tick:
    """Periodic: work stealing, worker time-outs (no heartbeat since ``now - timeout``)."""

    stimulus_id: str
    now: float


@message("recovered")
class Recovered:
    """The state was rebuilt from a log by a restarted scheduler: nobody is connected.

    Every worker becomes ``recovering`` (its replicas kept, its processing tasks
    rescheduled) until it registers again or ``grace`` seconds pass; every client but
    those in ``keep`` has as long to come back before its wishes are dropped
    (``core/recovery.py``).
    """

    stimulus_id: str
    now: float
    grace: float
    keep: Sequence[ClientId] = ()


# --------------------------------------------------------------------------------------
# Scheduler effects
# --------------------------------------------------------------------------------------


@message("to-worker")
class ToWorker:
    worker: WorkerAddr
    msg: Any  # a WorkerEvent


@message("to-client")
class ToClient:
    client: ClientId
    msg: Any  # a client message below


@message("close-worker")
class CloseWorker:
    """Ask the worker (and its nanny) to shut down: retirement or a stuck worker.

    A reason starting with ``HEARTBEAT_TIMEOUT`` means the scheduler gave the worker up
    for silence (a cut link, a stuck loop): a worker that reads it is alive after all and
    rejoins, as dask's does on a "missing" heartbeat reply (``WorkerState.closing_is_loss``).
    """

    worker: WorkerAddr
    reason: str


HEARTBEAT_TIMEOUT: Final = "no heartbeat for"
"""How a ``CloseWorker`` for a silent worker starts its reason (see ``CloseWorker``)."""


@message("log")
class Log:
    """Something a human should know (a worker lost, a task retried); shells log it."""

    level: str  # "info" | "warning" | "error"
    text: str


# Client messages (the msg of ToClient). Clients update futures from these.


@message("key-in-memory")
class KeyInMemory:
    key: Key
    type_name: str = ""


@message("key-erred")
class KeyErred:
    """``exception``/``traceback`` are the worker's pickled blobs, passed through."""

    key: Key
    exception: bytes
    traceback: bytes
    exception_text: str = ""


@message("key-cancelled")
class KeyCancelled:
    key: Key
    reason: str = ""


@message("key-lost")
class KeyLost:
    """The only copy was lost; it will be recomputed (futures go back to pending)."""

    key: Key


# --------------------------------------------------------------------------------------
# Worker events: from the scheduler (the msg of ToWorker)
# --------------------------------------------------------------------------------------


@message("compute-task")
class ComputeTask:
    """Run ``key``; ``who_has``/``nbytes`` locate and size its dependencies.

    ``priority`` orders ready tasks on the worker (lower first), as the scheduler
    computed it.
    """

    stimulus_id: str
    now: float
    key: Key
    run_spec: Any  # bytes, or bytes with out-of-band buffers (wire.runspec); None
    dependencies: Sequence[Key]
    who_has: dict[Key, Sequence[WorkerAddr]]
    nbytes: dict[Key, int]
    priority: Sequence[Any]
    resources: dict[str, float] | None = None
    duration: float = 0.5
    # which assignment this is: echoed by the TaskFinished/TaskErred that answers it, so
    # the scheduler can tell an answer to an older assignment of the key (0: untracked)
    run_id: int = 0


@message("free-keys")
class FreeKeys:
    """The scheduler no longer needs these keys here (results or replicas). ``seqs``: for
    a key scattered here, the latest data update of it the scheduler knew of when it sent
    this (none: a value it did not know came by scatter); a newer scattered value is not
    this free's to drop. ``None``: the sender numbers no scatter (drop as asked)."""

    stimulus_id: str
    now: float
    keys: Sequence[Key]
    seqs: dict[Key, int] | None = None


@message("steal-request")
class StealRequest:
    """Give ``key`` back if it has not started; answer with ``StealResponse``."""

    stimulus_id: str
    now: float
    key: Key


@message("acquire-replicas")
class AcquireReplicas:
    """Fetch copies of these keys (retirement, replication)."""

    stimulus_id: str
    now: float
    who_has: dict[Key, Sequence[WorkerAddr]]
    nbytes: dict[Key, int]


@message("refresh-who-has")
class RefreshWhoHas:
    """Fresh holders for keys the worker wants to fetch (after a ``MissingData``)."""

    stimulus_id: str
    now: float
    who_has: dict[Key, Sequence[WorkerAddr]]


# --------------------------------------------------------------------------------------
# Worker events: from the worker's own shell
# --------------------------------------------------------------------------------------


@message("execute-success")
class ExecuteSuccess:
    """The task ran; the shell already stored the value under ``key``."""

    stimulus_id: str
    now: float
    key: Key
    nbytes: int
    type_name: str = ""
    start: float = 0.0
    stop: float = 0.0


@message("execute-failure")
class ExecuteFailure:
    stimulus_id: str
    now: float
    key: Key
    exception: bytes
    traceback: bytes
    exception_text: str = ""
    traceback_text: str = ""
    start: float = 0.0
    stop: float = 0.0


@message("secede")
class SecedeEvent:
    """The running task called ``secede()``: free its thread slot."""

    stimulus_id: str
    now: float
    key: Key
    compute_duration: float = 0.0


@message("reschedule-event")
class RescheduleEvent:
    """The running task raised ``Reschedule``: give it back to the scheduler."""

    stimulus_id: str
    now: float
    key: Key


@message("gather-dep-success")
class GatherDepSuccess:
    """Fetched from ``peer``; the shell stored the values. ``data`` is ``key -> nbytes``."""

    stimulus_id: str
    now: float
    peer: WorkerAddr
    data: dict[Key, int]
    missing: Sequence[Key] = field(default_factory=list)  # asked for but the peer had not
    #: asked for, and the peer has them, but the value cannot travel (cannot be
    #: serialized there or loaded here): not a lost replica; the scheduler errs the key
    unusable: Sequence[Key] = field(default_factory=list)
    #: the peer's ``scatter_seq`` before it looked for the keys (``MissingData.errant_seq``)
    peer_seq: int | None = None


@message("gather-dep-failure")
class GatherDepFailure:
    """The fetch from ``peer`` failed (network, peer gone, unpicklable): try elsewhere."""

    stimulus_id: str
    now: float
    peer: WorkerAddr
    keys: Sequence[Key]
    reason: str = ""


@message("worker-update-data")
class WorkerUpdateData:
    """A client put data straight into this worker (scatter); stored already."""

    stimulus_id: str
    now: float
    data: dict[Key, int]


@message("memory-measured")
class MemoryMeasured:
    """Process memory from the shell (psutil RSS), compared with the thresholds."""

    stimulus_id: str
    now: float
    process_memory: int


@message("spill-failed")
class SpillFailed:
    """The value of ``key`` could not be pickled to disk: keep it in memory for good."""

    stimulus_id: str
    now: float
    key: Key
    reason: str = ""


@message("scheduler-lost")
class SchedulerLost:
    """The shell lost its scheduler stream (not a ``CloseWorker``): it reconnects.

    Whatever the scheduler had asked for is released (it reschedules it when the worker
    is back or gone); values in memory are kept, and offered again at registration.
    """

    stimulus_id: str
    now: float


@message("spill-written")
class SpillWritten:
    """The spill files of ``keys`` are complete: their bytes have left RAM.

    Reported for the write the core's last ``Spill`` of each key asked for (a write
    overtaken by ``Unspill``, ``DeleteData`` or a new value is never reported); a write
    that fails is reported as ``SpillFailed`` instead.
    """

    stimulus_id: str
    now: float
    keys: Sequence[Key]


# --------------------------------------------------------------------------------------
# Worker instructions
# --------------------------------------------------------------------------------------


@message("to-scheduler")
class ToScheduler:
    """Send ``msg`` (a scheduler event) on the stream to the scheduler.

    ``lazy``: nothing waits on it (a report such as ``ReleaseWorkerData``), so it may go
    with the next message written, up to the batch interval later, instead of waking
    the sender for a write of its own; it never overtakes what was sent before it.
    """

    msg: Any  # a SchedulerEvent
    lazy: bool = False


@message("execute")
class Execute:
    """Run the task's run_spec in a thread slot (its dependencies are in memory).

    ``behind``: every thread slot is taken; run it on the next thread that frees, after
    the task that thread runs (a prefetched task: ``WorkerState(prefetch=...)``).
    """

    key: Key
    run_spec: Any  # bytes, or bytes with out-of-band buffers (wire.runspec); None
    behind: bool = False


@message("gather-dep")
class GatherDep:
    """Fetch ``keys`` from ``peer`` in one request, then report a GatherDep* event."""

    peer: WorkerAddr
    keys: Sequence[Key]
    total_nbytes: int


@message("spill")
class Spill:
    """Move ``key``'s value from memory to disk; report ``SpillWritten`` once the file
    is complete, ``SpillFailed`` if it cannot be written."""

    key: Key


@message("unspill")
class Unspill:
    """Load ``key``'s value from disk back into memory (before a task reads it)."""

    key: Key


@message("delete-data")
class DeleteData:
    """Drop ``key``'s value (memory or disk)."""

    key: Key


# Which fields hold nested records, so ``load`` can rebuild them.
_NESTED.update({
    UpdateGraph: [(3, "list")],
    ToWorker: [(1, "one")],
    ToClient: [(1, "one")],
    ToScheduler: [(0, "one")],
})  # fmt: skip

SCHEDULER_EVENTS: tuple[type[Any], ...] = (
    AddClient, RemoveClient, UpdateGraph, UpdateData, ClientDesiresKeys, ClientReleasesKeys,
    CancelKeys, CancelAll, RetryKeys, AddWorker, RemoveWorker, RetireWorker, WorkerHeartbeat,
    WorkerStatusChange, TaskFinished, TaskErred, AddKeys, ReleaseWorkerData, MissingData,
    LongRunning, Reschedule, StealResponse, Tick, DropReplicas, Recovered, ActiveMemoryManager,
)  # fmt: skip
WORKER_EVENTS: tuple[type[Any], ...] = (
    ComputeTask, FreeKeys, StealRequest, AcquireReplicas, RefreshWhoHas, ExecuteSuccess,
    ExecuteFailure, SecedeEvent, RescheduleEvent, GatherDepSuccess, GatherDepFailure,
    WorkerUpdateData, MemoryMeasured, SpillFailed, SpillWritten, SchedulerLost,
)  # fmt: skip
CLIENT_MESSAGES: tuple[type[Any], ...] = (KeyInMemory, KeyErred, KeyCancelled, KeyLost)

ALL_MESSAGES: tuple[type[Any], ...] = tuple(_REGISTRY.values())
