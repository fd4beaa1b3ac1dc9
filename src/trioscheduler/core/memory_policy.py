"""Pure spill/pause policy of a worker: numbers in, decisions out.

The worker core owns the bookkeeping (which keys are in RAM, which on disk, their LRU
order); this module only answers the questions "how many bytes must go?", "which keys?"
and "should we pause?", so the policy can be read and tested without a state machine.

Thresholds follow dask's ``distributed.worker.memory.*``: fractions of the memory limit,
``None`` disables that threshold, and a memory limit of 0 disables all of them.

* ``target``: after storing a value, spill LRU keys while *managed* RAM exceeds it,
  less the ``write_ahead`` allowance: a spilled value stays in RAM until its file is
  complete, and a task may start with up to ``write_ahead`` bytes unwritten, so spilling
  down to ``target - write_ahead`` keeps what managed values hold in RAM (in memory plus
  being written) under ``target`` whenever a task starts, as dask's synchronous spill
  does (``spill_goal``).
* ``spill``: when the measured *process* memory exceeds it, spill LRU keys until the
  process would be back under ``target`` (or under ``spill`` if ``target`` is disabled).
* ``pause``: while the process memory exceeds it, start no task and fetch nothing.
* ``write_ahead``: while more bytes than this are booked as spilled but not yet reported
  written (``SpillWritten``), start no task, so that what the core counts as on disk is
  never far ahead of what has really left RAM.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from trioscheduler.core.messages import Key


@dataclass(slots=True, eq=False)
class MemoryThresholds:
    """The thresholds as absolute byte counts (``None``: disabled)."""

    limit: int
    target: int | None
    spill: int | None
    pause: int | None
    write_ahead: int | None = None

    @classmethod
    def from_fractions(
        cls,
        limit: int,
        target: float | None,
        spill: float | None,
        pause: float | None,
        write_ahead: float | None = 0.1,
    ) -> MemoryThresholds:
        """Turn dask-style fractions into byte counts once, not per event."""

        def absolute(frac: float | None) -> int | None:
            if not limit or frac is None or frac is False:
                return None
            return int(frac * limit)

        return cls(limit, absolute(target), absolute(spill), absolute(pause), absolute(write_ahead))


def spill_goal(th: MemoryThresholds) -> int | None:
    """Managed bytes in memory that spilling brings us down to: ``target`` less the
    write-ahead allowance (``None``: no target)."""
    if th.target is None:
        return None
    return max(0, th.target - (th.write_ahead or 0))


def target_excess(memory_bytes: int, th: MemoryThresholds) -> int:
    """Bytes of managed RAM above the spill goal (0 when under it or disabled)."""
    goal = spill_goal(th)
    if goal is None or memory_bytes <= goal:
        return 0
    return memory_bytes - goal


def process_excess(process_memory: int, th: MemoryThresholds) -> int:
    """Bytes to spill after a process-memory measurement (0 if under ``spill``).

    Above ``spill`` we aim for ``target`` (hysteresis, as dask does), so that a process
    hovering at the threshold does not spill one key per measurement.
    """
    if th.spill is None or process_memory <= th.spill:
        return 0
    goal = th.target if th.target is not None else th.spill
    return process_memory - goal


def should_pause(process_memory: int, th: MemoryThresholds) -> bool:
    """Pause while the process is above the pause threshold."""
    return th.pause is not None and process_memory > th.pause


def writes_behind(writing_bytes: int, th: MemoryThresholds) -> bool:
    """Too many spilled bytes are still unwritten to start a task."""
    return th.write_ahead is not None and writing_bytes > th.write_ahead


def choose_spill(
    lru: Iterable[tuple[Key, int]], excess: int, exclude: Collection[Key] = ()
) -> list[Key]:
    """Least-recently-used keys whose sizes add up to at least ``excess``.

    ``lru`` yields ``(key, nbytes)`` oldest first (lazily: we stop early). Keys in
    ``exclude`` (the inputs of the task about to start) are skipped; the result may free
    less than asked when nothing else is left.
    """
    chosen: list[Key] = []
    if excess <= 0:
        return chosen
    freed = 0
    for key, size in lru:
        if key in exclude:
            continue
        chosen.append(key)
        freed += size
        if freed >= excess:
            break
    return chosen
