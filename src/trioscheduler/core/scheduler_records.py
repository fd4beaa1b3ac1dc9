"""The scheduler's records: tasks, workers, clients, as slotted data.

Kept apart from ``scheduler.py`` (the event handlers) so that the transitions,
placement and stealing modules can name them without importing the state machine.
Sets of keys and addresses (not of records) so that shells read them as plain data.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Final

from trioscheduler.core.empty import EMPTY, EMPTY_MAP
from trioscheduler.core.messages import ClientId, Key, WorkerAddr

STATES: Final = (
    "released",
    "waiting",
    "no-worker",
    "queued",
    "processing",
    "memory",
    "erred",
    "forgotten",
)
# What a victim's answer to a ``StealRequest`` means (dask's ``stealing.py`` sets):
# it held the task queued and has dropped it: move it to the thief;
STEAL_CONFIRM: Final = frozenset({"waiting", "ready", "constrained"})
# it runs it, has run it or is bringing its value: the steal failed, the task stays.
STEAL_REJECT: Final = frozenset(
    {"executing", "long-running", "memory", "error", "cancelled", "resumed"}
)
# Any other answer (``released``, None: unknown there, or only a transfer of the key)
# means the victim does not hold the task as queued, so the steal's premise is gone:
# placement is decided again (``processing -> waiting``), not handed to the thief.


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class TaskPrefix:
    """Tasks sharing a key prefix (``inc`` of ``inc-ab12``) share a duration estimate."""

    name: str
    duration_average: float = -1.0  # seconds; < 0 while no task of the prefix finished
    n_finished: int = 0
    n_tasks: int = 0  # tasks of the prefix the scheduler knows (tiny groups: see rootish)
    # co-assignment without queuing: the worker taking this prefix's root tasks, and how
    # many more it takes (its share of the group) before the next worker starts
    last_worker: str | None = None
    last_worker_left: int = 0


@dataclass(slots=True, eq=False)
class ErrorInfo:
    """The blobs of a failure, carried into the ``erred`` transition."""

    exception: bytes
    traceback: bytes
    exception_text: str = ""
    traceback_text: str = ""
    blame: Key = None


@dataclass(slots=True, eq=False)
class TaskExtra:
    """What few tasks need: restrictions, retries, failures (see ``TaskRecord.extra``)."""

    retries: int = 0
    worker_restrictions: set[str] | None = None
    allow_other_workers: bool = False
    resource_restrictions: dict[str, float] | None = None
    suspicious: int = 0  # times a worker died while this task was processing on it
    killed_on: list[WorkerAddr] | None = None
    exception: bytes | None = None
    traceback: bytes | None = None
    exception_text: str = ""
    traceback_text: str = ""
    exception_blame: Key = None
    # worker -> the latest data update (scatter) of this key there we were told of. Keyed
    # by the registration, not the address: a new process there numbers its updates afresh
    scatter_seqs: dict[WorkerRecord, int] | None = None


class TaskRecord:
    """One key as the scheduler sees it.

    ``n_waiting``: dependencies not yet in memory (only meaningful while waiting).
    ``n_waiters``: dependents in an active state (waiting/no-worker/processing) that
    need this key's data; with ``wanted_by`` it decides when data may be released.
    Both are counts, not sets: an empty set costs 216 bytes, and the budget is ~1 KB per
    task. For the same reason the public collections start shared and empty (``EMPTY``,
    ``EMPTY_MAP``: read-only, so any accidental in-place mutation fails loudly) and are
    replaced by a real one on the first insertion.

    Determinism (a recorded log must replay alike under any ``PYTHONHASHSEED``): every
    collection of *keys* whose order can reach a decision or an effect is ordered:
    ``dependencies`` is a tuple in submission order, ``dependents`` a dict used as an
    insertion-ordered set (a 1-tuple while there is only one). ``who_has``/``wanted_by`` hold addresses/client ids (str):
    they stay sets, and are sorted wherever their order would show.

    Fields most tasks never use (restrictions, retries, failures) live in ``extra``, a
    ``TaskExtra`` created on first use, and read as plain attributes here: every slot
    costs 8 bytes and, measured, a large share of each full garbage collection, which
    visits every slot of every live record.
    """

    __slots__ = (
        "key", "run_spec", "priority", "prefix", "state", "dependencies", "dependents",
        "who_has", "wanted_by", "n_waiting", "n_waiters", "processing_on", "nbytes",
        "type_name", "extra"
    )  # fmt: skip

    key: Key
    run_spec: Any  # opaque: bytes or a wire.runspec record; None: no computation
    priority: tuple[Any, ...]
    prefix: TaskPrefix
    state: str
    dependencies: tuple[Key, ...]
    # ordered: a dict used as a set, or a 1-tuple while there is one (add_dependent)
    dependents: dict[Key, None] | tuple[Key]
    who_has: AbstractSet[WorkerAddr]  # replaced, not mutated (see added())
    wanted_by: AbstractSet[ClientId]
    n_waiting: int
    n_waiters: int
    processing_on: WorkerAddr | None
    nbytes: int
    type_name: str
    extra: TaskExtra | None

    def __init__(
        self, key: Key, run_spec: Any, priority: tuple[Any, ...], prefix: TaskPrefix
    ) -> None:
        # Written out, not a dataclass's: one record per task, and mypyc compiles this
        # __init__ (a dataclass's generated one would stay interpreted, ~5x slower).
        self.key = key
        self.run_spec = run_spec
        self.priority = priority
        self.prefix = prefix
        self.state = "released"
        self.dependencies = ()
        self.dependents = EMPTY_MAP
        self.who_has = EMPTY
        self.wanted_by = EMPTY
        self.n_waiting = 0
        self.n_waiters = 0
        self.processing_on = None
        self.nbytes = 0
        self.type_name = ""
        self.extra = None

    def __repr__(self) -> str:
        return f"<TaskRecord {self.key!r} {self.state}>"

    def _set_extra(self, name: str, value: Any, default: Any) -> None:
        """Set a ``TaskExtra`` field; the default needs no extra record (rare path)."""
        if self.extra is None:
            if value is default or (type(value) is type(default) and value == default):
                return
            self.extra = TaskExtra()
        setattr(self.extra, name, value)

    # ``TaskExtra`` fields, read and written as if they were the record's own: the
    # default while there is no extra record, which the first other value creates

    @property
    def retries(self) -> int:
        return 0 if self.extra is None else self.extra.retries

    @retries.setter
    def retries(self, value: int) -> None:
        self._set_extra("retries", value, 0)

    @property
    def worker_restrictions(self) -> set[str] | None:
        return None if self.extra is None else self.extra.worker_restrictions

    @worker_restrictions.setter
    def worker_restrictions(self, value: set[str] | None) -> None:
        self._set_extra("worker_restrictions", value, None)

    @property
    def allow_other_workers(self) -> bool:
        return False if self.extra is None else self.extra.allow_other_workers

    @allow_other_workers.setter
    def allow_other_workers(self, value: bool) -> None:
        self._set_extra("allow_other_workers", value, False)

    @property
    def resource_restrictions(self) -> dict[str, float] | None:
        return None if self.extra is None else self.extra.resource_restrictions

    @resource_restrictions.setter
    def resource_restrictions(self, value: dict[str, float] | None) -> None:
        self._set_extra("resource_restrictions", value, None)

    @property
    def suspicious(self) -> int:
        return 0 if self.extra is None else self.extra.suspicious

    @suspicious.setter
    def suspicious(self, value: int) -> None:
        self._set_extra("suspicious", value, 0)

    @property
    def killed_on(self) -> list[WorkerAddr] | None:
        return None if self.extra is None else self.extra.killed_on

    @killed_on.setter
    def killed_on(self, value: list[WorkerAddr] | None) -> None:
        self._set_extra("killed_on", value, None)

    @property
    def exception(self) -> bytes | None:
        return None if self.extra is None else self.extra.exception

    @exception.setter
    def exception(self, value: bytes | None) -> None:
        self._set_extra("exception", value, None)

    @property
    def traceback(self) -> bytes | None:
        return None if self.extra is None else self.extra.traceback

    @traceback.setter
    def traceback(self, value: bytes | None) -> None:
        self._set_extra("traceback", value, None)

    @property
    def exception_text(self) -> str:
        return "" if self.extra is None else self.extra.exception_text

    @exception_text.setter
    def exception_text(self, value: str) -> None:
        self._set_extra("exception_text", value, "")

    @property
    def traceback_text(self) -> str:
        return "" if self.extra is None else self.extra.traceback_text

    @traceback_text.setter
    def traceback_text(self, value: str) -> None:
        self._set_extra("traceback_text", value, "")

    @property
    def exception_blame(self) -> Key:
        return None if self.extra is None else self.extra.exception_blame

    @exception_blame.setter
    def exception_blame(self, value: Key) -> None:
        self._set_extra("exception_blame", value, None)


@dataclass(slots=True, eq=False)
class WorkerRecord:
    """One worker. ``processing`` maps key -> the duration estimate counted in
    ``occupancy`` (0 for long-running tasks, which free their thread slot).
    ``has_what`` is a dict used as an insertion-ordered set (deterministic order)."""

    address: WorkerAddr
    nthreads: int
    memory_limit: int = 0
    name: str | None = None
    nanny: str | None = None
    resources: dict[str, float] = field(default_factory=dict)
    status: str = "running"  # running | paused | closing | closed | recovering
    has_what: dict[Key, None] = field(default_factory=dict)
    processing: dict[Key, float] = field(default_factory=dict)
    long_running: set[Key] = field(default_factory=set)
    nbytes: int = 0
    occupancy: float = 0.0
    last_seen: float = 0.0
    incoming_steals: int = 0  # thread slots reserved for steals not yet confirmed
    retire_requested: dict[Key, WorkerAddr] | None = None  # retiring: key -> replica target
    # takes queued root tasks while it has fewer than ``queue_slots`` tasks or less than
    # ``backlog`` seconds of estimated work (see ``SchedulerState.worker_saturation``)
    queue_slots: int = 1
    backlog: float = 0.0
    single: frozenset[WorkerAddr] = frozenset()  # {address}, shared by who_has of its keys
    # the worker's last heartbeat (memory, spilled, executing, ...): read by dashboards,
    # never by a decision
    metrics: dict[str, Any] = field(default_factory=dict)
    incarnation: str | None = None  # its AddWorker's: which run of the worker this is

    def __post_init__(self) -> None:
        self.single = frozenset((self.address,))

    @property
    def used_slots(self) -> int:
        return len(self.processing) - len(self.long_running) + self.incoming_steals


@dataclass(slots=True, eq=False)
class ClientRecord:
    client: ClientId
    wants: set[Key] = field(default_factory=set)
    last_seen: float = 0.0
    single: frozenset[ClientId] = frozenset()  # {client}, shared by wanted_by of its keys

    def __post_init__(self) -> None:
        self.single = frozenset((self.client,))


@dataclass(slots=True, eq=False)
class PendingSteal:
    victim: WorkerAddr
    thief: WorkerAddr
    stimulus_id: str


def key_prefix(key: Key) -> str:
    """Group name of a key, as dask's ``key_split``: ``('inc-ab12', 3)`` -> ``inc``."""
    if type(key) is tuple:
        key = key[0] if key else ""
    if type(key) is bytes:
        key = key.decode(errors="replace")
    if type(key) is not str or not key:
        return "Other"
    words = key.split("-")
    result = words[0].strip("_'()\"")
    for word in words[1:]:
        if not word.isalpha() or (len(word) == 8 and _is_hex(word)):
            break
        result += "-" + word
    if len(result) == 32 and _is_hex(result):
        return "data"
    return result or "Other"


def _is_hex(word: str) -> bool:
    return all(c in "0123456789abcdef" for c in word)


def worker_host(addr: str) -> str:
    """``tcp://10.0.0.1:8786`` -> ``10.0.0.1`` (``[::1]`` for IPv6), for ``workers=`` by host."""
    rest = addr.split("://", 1)[-1]
    if rest.startswith("["):
        return rest[: rest.find("]") + 1]
    return rest.rsplit(":", 1)[0] if ":" in rest else rest
