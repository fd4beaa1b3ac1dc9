"""Adaptive scaling, decided: how many workers the backlog calls for, and which to close.

Pure: ``backlog_of`` reads a ``SchedulerState`` into a ``Backlog``; ``desired_workers``
turns it into a number of workers (dask's ``adaptive_target``); ``AdaptivePolicy.step``
turns that into a ``Decision`` -- scale up at once, scale down only workers that were
idle and surplus for ``wait_count`` consecutive steps (so a gap between two
computations does not throw workers away). The shell (``deploy.adaptive``) observes,
steps and carries decisions out on a timer.

The rules, as dask's:

* CPU: the estimated seconds of work waiting and running, divided by
  ``target_duration`` -- enough workers to finish the backlog in about that time, but
  never more than there are tasks to run (a few long tasks do not ask for many
  workers), and at least one while tasks wait and no worker runs.
* Memory: when the workers hold more than 60 % of their memory limits, double them.
* Down: only workers with no task assigned, those holding the least data first, and
  never so many that the rest could not hold the data kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AdaptivePolicy",
    "Backlog",
    "Decision",
    "WorkerLoad",
    "backlog_of",
    "desired_workers",
    "workers_to_close",
]

MEMORY_FRACTION = 0.6
"""Above this share of their memory limits held, the workers are doubled."""

SAMPLE = 100
"""Queued tasks whose duration is estimated one by one; the rest are extrapolated."""


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    address: str
    nthreads: int = 1
    processing: int = 0  # tasks assigned to it (running or about to)
    occupancy: float = 0.0  # their estimated seconds of work
    nbytes: int = 0  # data it holds
    memory_limit: int = 0  # 0: no limit


@dataclass(frozen=True, slots=True)
class Backlog:
    workers: tuple[WorkerLoad, ...] = ()
    waiting: int = 0  # runnable tasks no worker has yet (queued, or no worker fits)
    waiting_duration: float = 0.0  # their estimated seconds of work in total


def backlog_of(state: Any) -> Backlog:
    """What a ``SchedulerState`` holds, for ``desired_workers`` (reads, never writes)."""
    waiting_keys = list(state.queued) + list(state.unrunnable)
    tasks = state.tasks
    sample = [tasks[k] for k in waiting_keys[:SAMPLE] if k in tasks]
    duration = sum(state.duration_estimate(ts) for ts in sample)
    if len(waiting_keys) > len(sample) and sample:
        duration *= len(waiting_keys) / len(sample)
    workers = tuple(
        WorkerLoad(
            address=addr,
            nthreads=ws.nthreads,
            processing=len(ws.processing),
            occupancy=float(ws.occupancy),
            nbytes=int(ws.nbytes),
            memory_limit=int(ws.memory_limit or 0),
        )
        for addr, ws in sorted(state.workers.items())
        if ws.status in ("running", "paused")
    )
    return Backlog(workers, len(waiting_keys), duration)


def desired_workers(backlog: Backlog, target_duration: float) -> int:
    """How many workers would finish the backlog in about ``target_duration`` seconds."""
    if target_duration <= 0:
        raise ValueError(f"target_duration must be positive, got {target_duration}")
    workers = backlog.workers
    occupancy = sum(w.occupancy for w in workers) + backlog.waiting_duration
    cpu = math.ceil(occupancy / target_duration)
    tasks = backlog.waiting + sum(w.processing for w in workers)
    cpu = min(cpu, tasks)  # a few long tasks do not ask for more workers than tasks
    if backlog.waiting and not workers:
        cpu = max(1, cpu)
    limit = sum(w.memory_limit for w in workers)
    used = sum(w.nbytes for w in workers)
    memory = 2 * len(workers) if limit > 0 and used > MEMORY_FRACTION * limit else 0
    target = max(memory, cpu)
    if target >= len(workers):
        return target
    return len(workers) - len(workers_to_close(backlog, len(workers) - target))


def workers_to_close(backlog: Backlog, n: int) -> list[str]:
    """Up to ``n`` idle workers to close, those holding least data first; never so many
    that the others' memory limits could not hold the data kept (when limits are set)."""
    if n <= 0:
        return []
    idle = sorted((w for w in backlog.workers if w.processing == 0), key=lambda w: (w.nbytes, w.address))
    used = sum(w.nbytes for w in backlog.workers)
    limit = sum(w.memory_limit for w in backlog.workers)
    limited = all(w.memory_limit > 0 for w in backlog.workers)
    chosen: list[str] = []
    for w in idle:
        if len(chosen) == n:
            break
        if limited and used > 0 and limit - w.memory_limit < used / MEMORY_FRACTION:
            break
        limit -= w.memory_limit
        chosen.append(w.address)
    return chosen


@dataclass(frozen=True, slots=True)
class Decision:
    """``"up"`` to ``n`` workers, ``"down"`` closing ``workers``, or ``"same"``."""

    status: str
    n: int = 0
    workers: tuple[str, ...] = ()


@dataclass
class AdaptivePolicy:
    """Bounds and patience; ``close_counts`` is the state between steps."""

    minimum: int = 0
    maximum: float = math.inf
    wait_count: int = 3
    target_duration: float = 5.0
    close_counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.minimum < 0 or self.maximum < self.minimum:
            raise ValueError(
                f"adaptive bounds need 0 <= minimum <= maximum, got {self.minimum}, {self.maximum}"
            )
        if self.wait_count < 1:
            raise ValueError(f"wait_count must be at least 1, got {self.wait_count}")

    def target(self, backlog: Backlog) -> int:
        want = desired_workers(backlog, self.target_duration)
        return int(max(self.minimum, min(self.maximum, want)))

    def step(self, backlog: Backlog, planned: int | None = None) -> Decision:
        """One look at the backlog. ``planned``: workers the cluster runs or is starting
        (default: those in the backlog)."""
        planned = len(backlog.workers) if planned is None else planned
        target = self.target(backlog)
        if target >= planned:
            self.close_counts.clear()
            return Decision("up", n=target) if target > planned else Decision("same")
        candidates = workers_to_close(backlog, planned - target)
        self.close_counts = {w: self.close_counts.get(w, 0) + 1 for w in candidates}
        firing = tuple(w for w in candidates if self.close_counts[w] >= self.wait_count)
        if not firing:
            return Decision("same")
        for w in firing:
            del self.close_counts[w]
        return Decision("down", workers=firing)
