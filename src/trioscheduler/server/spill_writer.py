"""Carrying out the worker core's ``Spill``: files written in a thread, off the loop.

The core books a ``Spill`` at once and counts its bytes as being written; the file is
written here, by one writer task, in a thread, while the value stays readable, and each
finished write is reported back (``SpillWritten``) or its failure (``SpillFailed``).
Small values go to the thread several at a time (up to ``memory.SPILL_BATCH`` bytes);
spill files no longer needed are removed by the same thread. The core starts no task
while more than its write-ahead threshold (``memory.WRITE_AHEAD`` of the limit) is
unwritten, so its byte counts are never far ahead of the disk (with unbounded
write-behind a worker once ran past its terminate threshold).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import trio

from trioscheduler.core.messages import SpillFailed, SpillWritten
from trioscheduler.server import memory
from trioscheduler.server.stimuli import now as _now
from trioscheduler.server.stimuli import stimulus as _stimulus

__all__ = ["SpillWriter"]

logger = logging.getLogger("trioscheduler.worker")


class _Addressed(Protocol):
    address: str


class SpillWriter:
    """The queue of spill jobs and files to remove, and the one task that drains it.

    ``start`` runs a coroutine in the worker's nursery (or not at all while it closes);
    ``handle`` feeds the worker core; ``owner.address`` names the worker in logs.
    """

    __slots__ = ("_doomed", "_handle", "_jobs", "_owner", "_running", "_start", "_store")

    def __init__(
        self,
        store: memory.DataStore,
        start: Callable[..., None],
        handle: Callable[..., None],
        owner: _Addressed,
    ) -> None:
        self._store = store
        self._start = start
        self._handle = handle
        self._owner = owner
        self._jobs: deque[memory.SpillJob] = deque()
        self._doomed: list[str] = []  # spill files to remove
        self._running = False

    def spill(self, key: Any, nbytes: int) -> bool:
        """Queue ``key``'s file; False if nothing is left to write (its file is there
        already, or the key is unknown): the caller reports it written at once."""
        job = self._store.begin_spill(key, nbytes)
        if job is None:
            return False
        self._jobs.append(job)
        self._wake()
        return True

    def remove_later(self, path: str) -> None:
        """Remove a spill file in the writer's thread (the store's ``remove`` hook)."""
        self._doomed.append(path)
        self._wake()

    def _wake(self) -> None:
        if not self._running:
            self._running = True
            self._start(self._write)

    async def _write(self) -> None:
        store, jobs = self._store, self._jobs
        try:
            while jobs or self._doomed:
                doomed, self._doomed = self._doomed, []
                batch: list[memory.SpillJob] = []
                size = 0
                while jobs and size < memory.SPILL_BATCH:
                    job = jobs.popleft()
                    if store.writing.get(job.key) is not job:
                        continue  # deleted, replaced or wanted back before its turn
                    batch.append(job)
                    size += job.nbytes
                if batch or doomed:
                    await trio.to_thread.run_sync(memory.write_spills, batch, doomed)
                events = self._book(batch)
                if events:
                    self._handle(*events)
        finally:
            self._running = False

    def _book(self, batch: list[memory.SpillJob]) -> list[Any]:
        """The events for a written batch: one ``SpillWritten``, a ``SpillFailed`` each.

        A write overtaken by ``Unspill``, ``DeleteData`` or a new value is over for the
        core already: not reported.
        """
        store = self._store
        written: list[Any] = []
        events: list[Any] = []
        for job in batch:
            current = store.writing.get(job.key) is job
            error = store.finish_spill(job)
            if error is None:
                if current:
                    written.append(job.key)
                continue
            if isinstance(error, memory.UnpicklableValue):
                reason = "cannot be pickled"
            else:
                reason = f"could not write the spill file: {type(error).__name__}: {error}"
                logger.error("worker %s: spilling %r failed: %s", self._owner.address, job.key, reason)
            events.append(
                SpillFailed(stimulus_id=_stimulus("spill-failed"), now=_now(), key=job.key, reason=reason)
            )
        if written:
            stim = _stimulus("spill-written")
            events.insert(0, SpillWritten(stimulus_id=stim, now=_now(), keys=written))
        return events
