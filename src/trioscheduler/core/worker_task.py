"""One key as a worker knows it (``WorkerTask``): a task to compute, or data to hold or fetch."""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from typing import Any, Final

from trioscheduler.core.empty import EMPTY, EMPTY_MAP
from trioscheduler.core.messages import ComputeTask, Key

DEFAULT_NBYTES: Final = 1024
"""Size assumed for a dependency whose size the scheduler did not say (dask's default)."""


HeapEntry = tuple[tuple[Any, ...], int, "WorkerTask"]


class WorkerTask:
    """One key known to this worker: a task to compute, or data to hold or fetch.

    The collections start as shared, read-only empties (``()``, ``EMPTY_MAP``, ``EMPTY``)
    and are replaced, never mutated in place, until they hold something: most tasks
    never need some of them, and four empty containers per task cost time, memory and
    garbage-collector work.
    """

    __slots__ = (
        "key", "serial", "state", "run_spec", "priority", "dependencies", "dependents",
        "waiting_for_data", "who_has", "nbytes", "resources", "duration", "wanted",
        "coming_from", "errant_peer", "errant_seq", "previous", "next", "spillable",
        "pending_compute", "run_id",
    )  # fmt: skip

    key: Key
    serial: int  # creation order: deterministic tie-break in the heaps
    state: str
    run_spec: Any  # opaque: bytes or wire.runspec.OutOfBandRunSpec; None
    priority: tuple[Any, ...]
    dependencies: tuple[WorkerTask, ...]
    # active local tasks reading this key (insertion-ordered set: deterministic output)
    dependents: dict[WorkerTask, None]
    # the shared empty frozenset until the first item: then a set of the task's own
    waiting_for_data: AbstractSet[WorkerTask]
    who_has: AbstractSet[str]
    nbytes: int
    resources: dict[str, float] | None
    duration: float
    wanted: bool  # the scheduler counts this key as ours (result, replica, scatter)
    coming_from: str | None  # peer of the GatherDep carrying it
    errant_peer: str | None  # last peer that failed to deliver it
    errant_seq: int | None  # its data-update count when it said so (``MissingData``)
    previous: str | None  # cancelled/resumed: what is really running
    next: str | None  # resumed: what to become if that fails
    spillable: bool  # False after SpillFailed
    # resumed after a transfer: the ComputeTask to carry out if the transfer fails
    pending_compute: ComputeTask | None
    run_id: int  # of the latest ComputeTask: echoed by the TaskFinished/TaskErred

    def __init__(self, key: Key, serial: int) -> None:
        # Written out, not a dataclass's: one record per task, and mypyc compiles this
        # __init__ (a dataclass's generated one would stay interpreted, ~5x slower).
        self.key = key
        self.serial = serial
        self.state = "released"
        self.run_spec = None
        self.priority = ()
        self.dependencies = ()
        self.dependents = EMPTY_MAP
        self.waiting_for_data = EMPTY
        self.who_has = EMPTY
        self.nbytes = 0
        self.resources = None
        self.duration = 0.0
        self.wanted = False
        self.coming_from = None
        self.errant_peer = None
        self.errant_seq = None
        self.previous = None
        self.next = None
        self.spillable = True
        self.pending_compute = None
        self.run_id = 0

    def __repr__(self) -> str:
        return f"<WorkerTask {self.key!r} {self.state}>"
