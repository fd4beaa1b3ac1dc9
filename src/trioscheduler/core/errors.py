"""Errors the cores raise or hand to clients (pickled into ``KeyErred`` blobs)."""

from __future__ import annotations

from typing import Any

from trioscheduler.errors import TrioSchedulerError

RESTART_REASON = "the cluster was restarted (Client.restart); submit the work again"
"""Why a restart cancelled a client's keys (``KeyCancelled.reason``)."""


class InvalidTransition(TrioSchedulerError):
    """A task was asked to move along an edge that is not in its transition table.

    ``story`` is the list of what happened to the key before, so the bug report says
    how the task got there.
    """

    def __init__(self, key: Any, start: str, finish: str, story: list[Any]) -> None:
        self.key = key
        self.start = start
        self.finish = finish
        self.story = story
        lines = "\n".join(f"  {entry!r}" for entry in story[-20:])
        super().__init__(f"invalid transition of {key!r}: {start} -> {finish}\nstory:\n{lines}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key, self.start, self.finish, self.story))


class KilledWorker(TrioSchedulerError):
    """A task was running on ``allowed_failures`` workers that all died; it is now erred."""

    def __init__(self, key: Any, workers: list[str], allowed_failures: int) -> None:
        self.key = key
        self.workers = workers
        self.allowed_failures = allowed_failures
        super().__init__(
            f"task {key!r} was running on {len(workers)} workers that died "
            f"({', '.join(workers)}); it was given up after {allowed_failures} such losses. "
            "The task may be crashing its worker (segfault, out of memory)."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key, self.workers, self.allowed_failures))


class NoValidWorkerError(TrioSchedulerError):
    """A task could run on no worker for ``timeout`` seconds (dask's
    ``distributed.scheduler.no-workers-timeout``); it names what it asked for."""

    def __init__(self, key: Any, restrictions: str, timeout: float) -> None:
        self.key = key
        self.restrictions = restrictions
        self.timeout = timeout
        super().__init__(
            f"task {key!r} could run on no worker for {timeout:g} s: no running worker "
            f"satisfies {restrictions}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key, self.restrictions, self.timeout))


class CancelledKey(TrioSchedulerError):
    """The key was cancelled or released before it finished."""
