"""What the cluster simulator keeps of a task and of a worker shell, and its errors."""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from trioscheduler.core.messages import Key
from trioscheduler.core.recorder import Recorder
from trioscheduler.core.worker import WorkerState
from trioscheduler.core.worker_transitions import RUNNING_STATES

ALWAYS = 1 << 30
"""``SimTask.fail_attempts`` for a task that never succeeds."""
_MASK = (1 << 61) - 1


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
class SimRun:
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
    running: dict[Key, SimRun] = field(default_factory=dict)  # Execute received, not ended
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


def holds_thread(ts: Any) -> bool:
    st = ts.state
    return st in RUNNING_STATES or (
        (st == "cancelled" or st == "resumed") and ts.previous in RUNNING_STATES
    )
