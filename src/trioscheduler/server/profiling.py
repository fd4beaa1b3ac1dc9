"""What a worker's task threads are doing: the call stacks now, and a statistical profile.

Task threads register themselves in ``EXECUTING`` (thread id -> task key) while they
run a task (``executor.run_job``). ``call_stacks`` reads their frames once; the
``Sampler`` (one daemon thread per process, started by the first worker) looks at them
every ``interval`` seconds and counts each stack into a tree, one tree per task-key
prefix per ``cycle`` seconds, so ``profile(start, stop, key)`` merges only what was asked.

The tree is dask's format (``distributed.profile``), so dask's tools read it:
``{"identifier", "description": {"filename", "name", "line_number", "line"}, "count",
"children": {identifier: subtree}}``. With no task running, the sampler only sleeps.
"""

from __future__ import annotations

import linecache
import os
import sys
import threading
import time
import traceback
from collections import deque
from types import FrameType
from typing import Any

from trioscheduler.core.scheduler_records import key_prefix

__all__ = ["EXECUTING", "Sampler", "call_stacks", "merge", "sampler"]

EXECUTING: dict[int, Any] = {}
"""Thread id -> key of the task that thread runs now (set by ``executor.run_job``)."""


def _root() -> dict[str, Any]:
    return {
        "identifier": "root",
        "description": {"filename": "", "name": "", "line_number": 0, "line": ""},
        "count": 0,
        "children": {},
    }


def _add_stack(tree: dict[str, Any], frame: FrameType | None) -> None:
    """Count one sample of ``frame``'s stack (outermost call first) into ``tree``."""
    frames: list[Any] = []
    while frame is not None:
        frames.append(frame.f_code)
        frames.append(frame.f_lineno)
        frame = frame.f_back
    node = tree
    node["count"] += 1
    for i in range(len(frames) - 2, -1, -2):
        code, lineno = frames[i], frames[i + 1] or 0
        ident = f"{code.co_name};{code.co_filename};{code.co_firstlineno}"
        child = node["children"].get(ident)
        if child is None:
            child = node["children"][ident] = {
                "identifier": ident,
                "description": {
                    "filename": code.co_filename,
                    "name": code.co_name,
                    "line_number": lineno,
                    "line": linecache.getline(code.co_filename, lineno).strip(),
                },
                "count": 0,
                "children": {},
            }
        child["count"] += 1
        node = child


def merge(*trees: dict[str, Any]) -> dict[str, Any]:
    """One tree counting every sample of ``trees``."""
    out = _root()

    def add(dst: dict[str, Any], src: dict[str, Any]) -> None:
        dst["count"] += src["count"]
        for ident, child in src["children"].items():
            d = dst["children"].get(ident)
            if d is None:
                d = dst["children"][ident] = {
                    "identifier": ident,
                    "description": dict(child["description"]),
                    "count": 0,
                    "children": {},
                }
            add(d, child)

    for t in trees:
        add(out, t)
    return out


class Sampler:
    """Samples the task threads' stacks into per-cycle, per-prefix trees."""

    def __init__(self, interval: float = 0.01, cycle: float = 1.0, keep: int = 3600) -> None:
        self.interval = interval
        self.cycle = cycle
        self.cycles: deque[tuple[float, dict[str, dict[str, Any]]]] = deque(maxlen=keep)
        self._current: dict[str, dict[str, Any]] = {}
        self._cycle_start = time.time()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run, name="trioscheduler-profile", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            if EXECUTING:
                self.sample()
            now = time.time()
            if now - self._cycle_start >= self.cycle:
                self._rotate(now)

    def sample(self) -> None:
        # ``_current_frames`` includes this very frame: the dict and this frame would form
        # a cycle holding every thread's frames, and with them the tasks' locals (large
        # arrays), until a garbage collection. So the dict never outlives the loop.
        frames = sys._current_frames()
        try:
            with self._lock:
                for ident, key in list(EXECUTING.items()):
                    frame = frames.get(ident)
                    if frame is None:
                        continue
                    prefix = key_prefix(key)
                    tree = self._current.get(prefix)
                    if tree is None:
                        tree = self._current[prefix] = _root()
                    _add_stack(tree, frame)
        finally:
            frame = None
            del frames

    def _rotate(self, now: float) -> None:
        with self._lock:
            if self._current:
                self.cycles.append((self._cycle_start, self._current))
            self._current = {}
            self._cycle_start = now

    def profile(
        self, start: float | None = None, stop: float | None = None, key: Any = None
    ) -> dict[str, Any]:
        """Samples taken between ``start`` and ``stop`` (epoch seconds), of tasks whose
        key prefix is ``key``'s (all tasks if ``None``)."""
        lo = -float("inf") if start is None else start
        hi = float("inf") if stop is None else stop
        prefix = None if key is None else key_prefix(key)
        with self._lock:
            cycles = [*self.cycles, (self._cycle_start, self._current)]
            picked = [
                tree
                for t, trees in cycles
                if t + self.cycle >= lo and t <= hi
                for p, tree in trees.items()
                if prefix is None or p == prefix
            ]
            return merge(*picked)


_sampler: Sampler | None = None


def sampler() -> Sampler:
    """This process's sampler, started on first use (again after a fork)."""
    global _sampler
    if _sampler is None or _sampler._pid != os.getpid():
        _sampler = Sampler()
    _sampler.start()
    return _sampler


def call_stacks(keys: list[Any] | None = None) -> dict[Any, list[str]]:
    """``{key: formatted stack lines}`` of the tasks running now (``keys`` only, if given)."""
    frames = sys._current_frames()
    wanted = None if keys is None else set(keys)
    out: dict[Any, list[str]] = {}
    try:
        for ident, key in list(EXECUTING.items()):
            if wanted is not None and key not in wanted:
                continue
            frame = frames.get(ident)
            if frame is not None:
                out[key] = traceback.format_stack(frame)
    finally:
        frame = None
        del frames  # see ``Sampler.sample``: no cycle through this frame
    return out
