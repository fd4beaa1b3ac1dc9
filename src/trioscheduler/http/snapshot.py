"""One snapshot of the scheduler's state, shared by every open page.

``take_snapshot`` is a plain function of the scheduler's state, the task stream and two
clocks: it reads, never writes, and imports no trio, so tests call it directly.
``SnapshotCache`` rebuilds it at most once per ``max_age`` seconds (0.45) and keeps each JSON
body encoded (and gzipped) once per snapshot, so the dashboard's cost does not grow with
the number of tabs that poll it: a second tab costs one cached reply per poll.

Column names follow dask's dashboard where it has one (``progress_quads``: ``name, all,
memory, erred, released, processing, queued, done``; ``counts.json``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from trioscheduler.http.task_stream import TaskStream

if TYPE_CHECKING:
    from trioscheduler.core.scheduler import SchedulerState

__all__ = ["DashboardSource", "Snapshot", "SnapshotCache", "take_snapshot"]

STATES = ("released", "waiting", "no-worker", "queued", "processing", "memory", "erred")
MAX_PREFIXES = 50  # progress rows shown (the most recent prefixes)
STREAM_RECTS = 1000  # task-stream rectangles sent to a page (dask's status page: 1000)
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173",
)  # fmt: skip
TRANSFER_COLOR = "#d62728"  # red, as dask's
ERRED_COLOR = "#000000"


class DashboardSource(Protocol):
    """What the dashboard reads from the scheduler shell (which passes itself)."""

    address: str
    state: SchedulerState
    task_stream: TaskStream

    async def worker_logs(self, address: str) -> list[str]:
        """The worker's recent log lines (asked of the worker; an error says why not)."""
        ...


def prefix_color(prefix: str) -> str:
    """A colour per task prefix, the same in every process (crc32, not ``hash``)."""
    return PALETTE[zlib.crc32(prefix.encode()) % len(PALETTE)]


def format_bytes(n: float) -> str:
    for unit in ("B", "kiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


@dataclass(slots=True)
class Snapshot:
    taken: float  # scheduler clock
    wall: float  # time.time() when taken
    counts: dict[str, Any]
    progress: dict[str, list[Any]]  # columns, one row per task prefix
    workers: list[dict[str, Any]]  # one row per worker
    memory: dict[str, list[Any]]  # columns, one row per worker (stacked bars)
    processing: dict[str, list[Any]]
    stream: dict[str, list[Any]]  # columns, one row per rectangle
    prefix_nbytes: dict[str, int]
    identity: dict[str, Any]
    _bodies: dict[str, tuple[bytes, bytes | None, str]] = field(default_factory=dict)

    def status_payload(self) -> dict[str, Any]:
        """What ``/status`` polls: every data source of the page and its texts at once."""
        c = self.counts
        return {
            "sources": {
                "progress_source": self.progress,
                "memory_source": self.memory,
                "processing_source": self.processing,
                "task_stream_source": self.stream,
                "cluster_memory_source": {
                    "y": [0],
                    "bytes": [c["bytes"]],
                    "text": [format_bytes(c["bytes"])],
                },
            },
            "titles": {
                "task_progress": progress_title(c),
                "cluster_memory": "Bytes stored: " + format_bytes(c["bytes"]),
            },
            "text": {
                "tasks-done": str(c["done"]),
                "tasks-total": str(c["tasks"]),
                "workers": str(c["workers"]),
                "threads": str(c["cores"]),
            },
        }

    def workers_payload(self) -> dict[str, Any]:
        rows = self.workers
        columns: dict[str, list[Any]] = {
            name: [row[name] for row in rows] for name in _WORKER_COLUMNS
        }
        return {
            "sources": {"workers_source": columns},
            "titles": {},
            "text": {"workers": str(len(rows))},
        }

    def body(self, name: str, build: Callable[[], Any]) -> tuple[bytes, bytes | None, str]:
        """``(json, gzipped or None, etag)`` of ``build()``, made once per snapshot."""
        cached = self._bodies.get(name)
        if cached is None:
            raw = json.dumps(build(), separators=(",", ":"), default=str).encode()
            gz = gzip.compress(raw, 6) if len(raw) > 1400 else None
            etag = '"' + hashlib.blake2b(raw, digest_size=12).hexdigest() + '"'
            cached = self._bodies[name] = (raw, gz, etag)
        return cached


def progress_title(c: dict[str, Any]) -> str:
    return (
        f"Progress -- total: {c['tasks']}, waiting: {c['waiting']}, queued: {c['queued']}, "
        f"processing: {c['processing']}, in-memory: {c['memory']}, "
        f"no-worker: {c['no-worker']}, erred: {c['erred']}"
    )


_WORKER_COLUMNS = (
    "address", "name", "nthreads", "memory", "memory_limit", "managed", "unmanaged",
    "spilled", "executing", "in_memory", "processing", "cpu", "last_seen", "status",
    "memory_text", "limit_text", "managed_text", "spilled_text",
)  # fmt: skip


def take_snapshot(source: DashboardSource, *, now: float, wall: float) -> Snapshot:
    """Read everything the pages show, once. ``now``: the scheduler's clock (for
    ``last_seen``); ``wall``: ``time.time()`` (the task stream's clock)."""
    state = source.state
    by_state = dict.fromkeys(STATES, 0)
    per_prefix: dict[str, list[int]] = {}
    prefix_nbytes: dict[str, int] = {}
    index = {s: i for i, s in enumerate(STATES)}
    for ts in state.tasks.values():
        st = ts.state
        i = index.get(st)
        if i is None:
            continue
        by_state[st] += 1
        name = ts.prefix.name
        row = per_prefix.get(name)
        if row is None:
            row = per_prefix[name] = [0] * len(STATES)
        row[i] += 1
        if st == "memory":
            prefix_nbytes[name] = prefix_nbytes.get(name, 0) + max(ts.nbytes, 0)

    workers = _worker_rows(source, now)
    counts: dict[str, Any] = {
        **by_state,
        "tasks": sum(by_state.values()),
        "done": by_state["memory"] + by_state["erred"] + by_state["released"],
        "workers": len(workers),
        "cores": sum(w["nthreads"] for w in workers),
        "bytes": sum(w["managed"] + w["spilled"] for w in workers),
        "clients": sum(1 for c in state.clients if c != "fire-and-forget"),
        "unrunnable": by_state["no-worker"],
        "paused": sum(1 for w in workers if w["status"] == "paused"),
    }
    return Snapshot(
        taken=now,
        wall=wall,
        counts=counts,
        progress=_progress_columns(per_prefix),
        workers=workers,
        memory=_memory_columns(workers),
        processing={
            "y": list(range(len(workers))),
            "name": [w["name"] for w in workers],
            "processing": [w["processing"] for w in workers],
            "executing": [w["executing"] for w in workers],
            "text": [f"{w['name']}: {w['processing']} processing" for w in workers],
        },
        stream=_stream_columns(source.task_stream),
        prefix_nbytes=prefix_nbytes,
        identity={
            "type": "Scheduler",
            "address": source.address,
            "workers": {w["address"]: {k: w[k] for k in _IDENTITY_KEYS} for w in workers},
        },
    )


_IDENTITY_KEYS = ("name", "nthreads", "memory_limit", "status", "memory", "managed", "spilled")


def _worker_rows(source: DashboardSource, now: float) -> list[dict[str, Any]]:
    rows = []
    for addr in sorted(source.state.workers):
        ws = source.state.workers[addr]
        metrics: dict[str, Any] = getattr(ws, "metrics", None) or {}
        spilled = int(metrics.get("spilled_bytes", 0) or 0)
        managed = max(int(ws.nbytes) - spilled, 0)  # the scheduler's count, at once
        rss = int(metrics.get("memory", 0) or 0)
        unmanaged = max(rss - managed, 0) if rss else 0
        limit = int(ws.memory_limit or 0)
        rows.append(
            {
                "address": addr,
                "name": str(ws.name if ws.name is not None else addr),
                "nthreads": int(ws.nthreads),
                "memory": rss,
                "memory_limit": limit,
                "managed": managed,
                "unmanaged": unmanaged,
                "spilled": spilled,
                "executing": int(metrics.get("executing", 0) or 0),
                "in_memory": len(ws.has_what),
                "processing": len(ws.processing),
                "cpu": float(metrics.get("cpu", 0.0) or 0.0),
                "last_seen": round(max(now - ws.last_seen, 0.0), 1),
                "status": ws.status,
                "memory_text": format_bytes(rss),
                "limit_text": format_bytes(limit) if limit else "",
                "managed_text": format_bytes(managed),
                "spilled_text": format_bytes(spilled),
            }
        )
    return rows


def _progress_columns(per_prefix: dict[str, list[int]]) -> dict[str, list[Any]]:
    cols: dict[str, list[Any]] = {
        k: []
        for k in (
            "y", "name", "all", "done", "memory", "erred", "released", "processing", "queued",
            "waiting", "no_worker", "label", "color", "erred_right", "memory_right",
            "released_right", "processing_right", "queued_right", "waiting_right",
        )
    }  # fmt: skip
    names = list(per_prefix)[-MAX_PREFIXES:]
    for i, name in enumerate(reversed(names)):  # the newest prefix on top, at y = 0
        y = -i
        released, waiting, no_worker, queued, processing, memory, erred = per_prefix[name]
        total = released + waiting + no_worker + queued + processing + memory + erred
        done = memory + erred + released
        f = 1.0 / total if total else 0.0
        right = 0.0
        for col, n in (
            ("erred_right", erred), ("memory_right", memory), ("released_right", released),
            ("processing_right", processing), ("queued_right", queued),
            ("waiting_right", waiting + no_worker),
        ):  # fmt: skip
            right += n * f
            cols[col].append(right)
        for col, value in (
            ("y", y), ("name", name), ("all", total), ("done", done), ("memory", memory),
            ("erred", erred), ("released", released), ("processing", processing),
            ("queued", queued), ("waiting", waiting), ("no_worker", no_worker),
            ("label", f"{name}: {done} / {total}"), ("color", prefix_color(name)),
        ):  # fmt: skip
            cols[col].append(value)
    return cols


def _memory_columns(workers: list[dict[str, Any]]) -> dict[str, list[Any]]:
    cols: dict[str, list[Any]] = {
        k: []
        for k in (
            "y", "name", "address", "managed", "unmanaged", "spilled", "limit",
            "managed_right", "unmanaged_right", "spilled_right", "text",
        )
    }  # fmt: skip
    for y, w in enumerate(workers):
        managed, unmanaged, spilled = w["managed"], w["unmanaged"], w["spilled"]
        for col, value in (
            ("y", y), ("name", w["name"]), ("address", w["address"]), ("managed", managed),
            ("unmanaged", unmanaged), ("spilled", spilled), ("limit", w["memory_limit"]),
            ("managed_right", managed), ("unmanaged_right", managed + unmanaged),
            ("spilled_right", managed + unmanaged + spilled),
            ("text", f"{w['name']}: {format_bytes(managed)} managed"
             + (f", {format_bytes(spilled)} spilled" if spilled else "")),
        ):  # fmt: skip
            cols[col].append(value)
    return cols


def _stream_columns(stream: TaskStream) -> dict[str, list[Any]]:
    cols: dict[str, list[Any]] = {
        k: [] for k in ("lane", "start", "stop", "key", "name", "kind", "worker", "color")
    }
    for e in stream.last(STREAM_RECTS):
        if e.kind == "transfer":
            color = TRANSFER_COLOR
        elif e.kind == "erred":
            color = ERRED_COLOR
        else:
            color = prefix_color(e.prefix)
        for col, value in (
            ("lane", e.lane), ("start", e.start * 1000), ("stop", e.stop * 1000),
            ("key", e.key[:100]), ("name", e.prefix), ("kind", e.kind), ("worker", e.worker),
            ("color", color),
        ):  # fmt: skip
            cols[col].append(value)
    return cols


SNAPSHOT_MAX_AGE = 0.45
"""Seconds a snapshot is shared. Just under the pages' poll interval (0.5 s): one tab gets
a fresh one each poll, and more tabs polling at other phases do not make it rebuild
more often (at 0.2 s, five tabs rebuilt it five times a second, twice as often as one:
measured, ~0.2% of a core per extra tab)."""


class SnapshotCache:
    """The latest snapshot while it is younger than ``max_age`` (scheduler clock)."""

    def __init__(
        self,
        source: DashboardSource,
        clock: Callable[[], float],
        wall: Callable[[], float],
        max_age: float = SNAPSHOT_MAX_AGE,
    ) -> None:
        self.source = source
        self.clock = clock
        self.wall = wall
        self.max_age = max_age
        self.builds = 0  # snapshots taken, for tests and the benchmark
        self._snapshot: Snapshot | None = None

    def get(self) -> Snapshot:
        now = self.clock()
        snap = self._snapshot
        if snap is None or now - snap.taken >= self.max_age:
            snap = self._snapshot = take_snapshot(self.source, now=now, wall=self.wall())
            self.builds += 1
        return snap
