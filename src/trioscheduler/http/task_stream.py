"""The task stream: when each task ran and each transfer happened, on which worker lane.

The scheduler shell hands every ``TaskFinished``, ``TaskErred`` and ``WorkerHeartbeat``
(whose metrics carry the worker's recent transfers) to ``observe`` while someone wants
the stream (a running dashboard, an open ``performance_report``); otherwise recording
is off and costs one attribute test per message. Entries are kept in a bounded deque.

Each entry gets a lane when it arrives: the first lane of its worker that is free at
its start, so one lane is one worker thread in practice (tasks of a thread do not
overlap) and lanes do not move between updates of a page. Times are the workers' wall
clocks (``time.time()``), which on one machine agree.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from trioscheduler.core import messages as m
from trioscheduler.core.scheduler_records import key_prefix

__all__ = ["StreamEntry", "TaskStream"]


@dataclass(slots=True)
class StreamEntry:
    kind: str  # "compute" | "erred" | "transfer"
    key: str  # the task's key as text (a transfer: its first key)
    prefix: str
    worker: str
    start: float
    stop: float
    lane: int  # global lane number (stable)
    nbytes: int = 0
    peer: str = ""  # a transfer's source worker


class TaskStream:
    def __init__(self, maxlen: int = 10_000) -> None:
        self.entries: deque[StreamEntry] = deque(maxlen=maxlen)
        self.wanted = 0  # > 0: record (dashboards and reports add and remove themselves)
        self.version = 0  # bumped per new entry: an unchanged stream is not sent again
        self._lanes: dict[str, list[tuple[int, float]]] = {}  # worker -> [(lane, free_at)]
        self._lane_names: list[str] = []  # lane number -> "worker thread-i"
        # totals since start, for /metrics (counters)
        self.compute_seconds: dict[str, float] = {}  # prefix -> seconds
        self.transfer_bytes: dict[str, int] = {}  # receiving worker -> bytes
        self.transfer_count: dict[str, int] = {}

    def observe(self, msg: Any) -> None:
        if not self.wanted:
            return
        t = type(msg)
        if t is m.TaskFinished or t is m.TaskErred:
            if msg.stop > 0:
                prefix = key_prefix(msg.key)
                self.compute_seconds[prefix] = (
                    self.compute_seconds.get(prefix, 0.0) + msg.stop - msg.start
                )
                kind = "compute" if t is m.TaskFinished else "erred"
                self._add(kind, msg.key, prefix, msg.worker, msg.start, msg.stop)
        elif t is m.WorkerHeartbeat:
            for record in msg.metrics.get("transfers", ()) or ():
                self._transfer(msg.worker, record)

    def _transfer(self, worker: str, record: Any) -> None:
        try:
            start, stop, peer, nbytes, keys = record[:5]
            start, stop, nbytes = float(start), float(stop), int(nbytes)
        except (TypeError, ValueError):
            return  # a malformed record from a worker is not worth a connection
        first = keys[0] if isinstance(keys, list | tuple) and keys else ""
        if isinstance(first, list):  # a tuple key, as msgpack delivers it
            first = tuple(first)
        self.transfer_bytes[worker] = self.transfer_bytes.get(worker, 0) + nbytes
        self.transfer_count[worker] = self.transfer_count.get(worker, 0) + 1
        entry = self._add("transfer", first, key_prefix(first), worker, start, stop)
        entry.nbytes, entry.peer = nbytes, str(peer)

    def _add(
        self, kind: str, key: Any, prefix: str, worker: str, start: float, stop: float
    ) -> StreamEntry:
        lanes = self._lanes.setdefault(worker, [])
        for i, (lane, free_at) in enumerate(lanes):
            if free_at <= start:
                lanes[i] = (lane, stop)
                break
        else:
            lane = len(self._lane_names)
            self._lane_names.append(f"{worker} {len(lanes)}")
            lanes.append((lane, stop))
        entry = StreamEntry(kind, str(key), prefix, worker, start, stop, lane)
        self.entries.append(entry)
        self.version += 1
        return entry

    def lane_name(self, lane: int) -> str:
        return self._lane_names[lane]

    def since(self, start: float) -> Iterator[StreamEntry]:
        """Entries that ended at or after ``start`` (wall clock)."""
        return (e for e in self.entries if e.stop >= start)

    def last(self, n: int) -> list[StreamEntry]:
        entries = self.entries
        if len(entries) <= n:
            return list(entries)
        return list(entries)[-n:]

    def forget_workers(self, alive: Iterable[str]) -> None:
        """Drop the lane tables of workers that left (their entries age out of the deque)."""
        keep = set(alive)
        for worker in [w for w in self._lanes if w not in keep]:
            del self._lanes[worker]
