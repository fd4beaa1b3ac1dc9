"""Progress bars per task group (key prefix) for futures and persisted collections.

Built only on what every future offers: ``key``, ``done()`` and
``add_done_callback(fn)``. Done callbacks may run in any thread (the client calls them
from a helper thread), so they only bump counters under a lock; the thread that shows
progress redraws on a short interval. This keeps the client free of any knowledge of
progress bars, and works the same for ``concurrent.futures`` futures.

A terminal gets one tqdm bar per group; anything else (a log file, CI output) gets plain
text lines, printed when a group's count changes (at most once per ``text_interval``) and
once at the end, so logs stay readable.
"""

from __future__ import annotations

import concurrent.futures
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TextIO

from dask.utils import key_split

from trioscheduler.client.collections import futures_of, is_future

__all__ = ["GroupProgress", "ProgressTracker", "aprogress", "progress"]


@dataclass(slots=True)
class GroupProgress:
    """Counts for one task group: ``done`` includes ``erred``."""

    name: str
    total: int = 0
    done: int = 0
    erred: int = 0


def _failed(future: Any) -> bool:
    """Did the finished ``future`` end in an error or cancellation? (never blocks)"""
    # class first: a status attribute of the type (our Future's property), not __getattr__
    status = getattr(future, "status", None) if hasattr(type(future), "status") else None
    if isinstance(status, str):
        return status in ("error", "erred", "cancelled")
    if isinstance(future, concurrent.futures.Future):
        return future.cancelled() or future.exception(timeout=0) is not None
    return False


class ProgressTracker:
    """Per-group completion counts, kept current by done callbacks from any thread."""

    def __init__(
        self,
        futures: Iterable[Any],
        *,
        group_of: Callable[[Any], str] = key_split,
    ) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self.groups: dict[str, GroupProgress] = {}
        self._pending = 0
        self.start = time.monotonic()
        watched: list[tuple[Any, GroupProgress]] = []
        seen: set[Any] = set()
        for f in futures:
            if f.key in seen:
                continue
            seen.add(f.key)
            name = group_of(f.key)
            group = self.groups.get(name)
            if group is None:
                group = self.groups[name] = GroupProgress(name)
            group.total += 1
            self._pending += 1
            watched.append((f, group))
        for f, group in watched:  # after counting: a callback may fire right away
            f.add_done_callback(self._callback(group))

    def _callback(self, group: GroupProgress) -> Callable[[Any], None]:
        counted = False

        def on_done(future: Any) -> None:
            nonlocal counted
            failed = _failed(future)
            with self._lock:
                if counted:
                    return
                counted = True
                group.done += 1
                group.erred += failed
                self._pending -= 1
            self._changed.set()

        return on_done

    @property
    def finished(self) -> bool:
        return self._pending == 0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def snapshot(self) -> list[GroupProgress]:
        """A consistent copy of every group's counts."""
        with self._lock:
            return [GroupProgress(g.name, g.total, g.done, g.erred) for g in self.groups.values()]

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` s for a change; ``True`` if something changed."""
        changed = self._changed.wait(timeout)
        self._changed.clear()
        return changed


# --------------------------------------------------------------------------------------
# Displays
# --------------------------------------------------------------------------------------


def _tqdm_class(notebook: bool) -> Any:
    if notebook:
        import tqdm.notebook

        if getattr(tqdm.notebook, "IProgress", None) is not None:  # ipywidgets present
            return tqdm.notebook.tqdm
        # without ipywidgets a text bar still renders in a notebook's output cell
    from tqdm import tqdm

    return tqdm


class _TqdmDisplay:
    """One tqdm bar per group (``tqdm.notebook`` widgets when asked and available)."""

    def __init__(self, groups: list[GroupProgress], file: TextIO, notebook: bool) -> None:
        bar_type: Any = _tqdm_class(notebook)
        width = max(len(g.name) for g in groups)
        self._bars = {
            g.name: bar_type(
                total=g.total,
                desc=g.name.ljust(width),
                position=i,
                file=file,
                leave=True,
                dynamic_ncols=True,
                unit="task",
            )
            for i, g in enumerate(groups)
        }
        self._shown = {g.name: 0 for g in groups}

    def update(self, groups: list[GroupProgress]) -> None:
        for g in groups:
            bar = self._bars[g.name]
            if g.done != self._shown[g.name]:
                if g.erred:
                    bar.set_postfix_str(f"{g.erred} erred", refresh=False)
                bar.update(g.done - self._shown[g.name])
                self._shown[g.name] = g.done

    def close(self, groups: list[GroupProgress]) -> None:
        self.update(groups)
        for bar in self._bars.values():
            bar.close()


class _TextDisplay:
    """Plain lines, no cursor movement: for logs, pipes and CI."""

    def __init__(self, file: TextIO, interval: float, start: float) -> None:
        self._file = file
        self._interval = interval
        self._start = start
        self._last_print = 0.0
        self._last: dict[str, tuple[int, int]] = {}

    def _line(self, g: GroupProgress) -> str:
        width = 20
        filled = width * g.done // g.total if g.total else width
        percent = 100 * g.done // g.total if g.total else 100
        erred = f", {g.erred} erred" if g.erred else ""
        elapsed = time.monotonic() - self._start
        return (
            f"[{'#' * filled}{' ' * (width - filled)}] {percent:3d}% "
            f"{g.name}: {g.done}/{g.total}{erred} | {elapsed:.1f}s"
        )

    def update(self, groups: list[GroupProgress], *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_print < self._interval:
            return
        lines = [
            self._line(g) for g in groups if self._last.get(g.name) != (g.done, g.erred) or force
        ]
        if not lines:
            return
        self._last_print = now
        self._last = {g.name: (g.done, g.erred) for g in groups}
        self._file.write("\n".join(lines) + "\n")
        self._file.flush()

    def close(self, groups: list[GroupProgress]) -> None:
        self.update(groups, force=True)


def _display(
    tracker: ProgressTracker, file: TextIO, notebook: bool, text_interval: float
) -> _TqdmDisplay | _TextDisplay | None:
    groups = tracker.snapshot()
    if not groups:
        return None
    try:
        tty = file.isatty()
    except (AttributeError, ValueError):  # closed or file-like without isatty
        tty = False
    if tty or notebook:
        return _TqdmDisplay(groups, file, notebook)
    return _TextDisplay(file, text_interval, tracker.start)


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def progress(
    *futures_or_collections: Any,
    notebook: bool = False,
    file: TextIO | None = None,
    interval: float = 0.1,
    text_interval: float = 1.0,
    is_future: Callable[[Any], bool] = is_future,
    group_of: Callable[[Any], str] = key_split,
) -> None:
    """Show progress per task group until every future is done (blocking).

    Accepts futures, persisted collections (their futures are found with
    ``futures_of``), and lists or dicts of them. A terminal (``file`` defaults to
    stderr, as tqdm) gets tqdm bars; other outputs get plain text lines.
    """
    tracker = ProgressTracker(futures_of(futures_or_collections, is_future), group_of=group_of)
    out = file if file is not None else sys.stderr
    display = _display(tracker, out, notebook, text_interval)
    if display is None:
        return
    try:
        while not tracker.finished:
            tracker.wait(interval)
            display.update(tracker.snapshot())
    finally:
        display.close(tracker.snapshot())


async def aprogress(
    *futures_or_collections: Any,
    notebook: bool = False,
    file: TextIO | None = None,
    interval: float = 0.1,
    text_interval: float = 1.0,
    is_future: Callable[[Any], bool] = is_future,
    group_of: Callable[[Any], str] = key_split,
) -> None:
    """``progress`` for async code (trio or asyncio): polls without blocking the loop."""
    import anyio

    tracker = ProgressTracker(futures_of(futures_or_collections, is_future), group_of=group_of)
    out = file if file is not None else sys.stderr
    display = _display(tracker, out, notebook, text_interval)
    if display is None:
        return
    try:
        while not tracker.finished:
            await anyio.sleep(interval)
            display.update(tracker.snapshot())
    finally:
        display.close(tracker.snapshot())
