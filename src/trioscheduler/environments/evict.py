"""Keeping a host's environment cache bounded: least recently used entries go first.

The bounds are a number of entries and a total size (``Limits``; per nanny, default
``DEFAULT_MAX_COUNT`` entries and ``DEFAULT_MAX_SIZE`` bytes, or the environment
variables below). A nanny evicts after it added an entry, never before: the one it just
made, and every entry a worker runs in, is leased (``cache.Lease``) and stays.

An entry is evicted by taking its ``.in-use`` lock exclusively without waiting (a lease
holder makes that fail: the entry is in use, skip it), renaming it to ``.evict-*`` while
holding the lock, and only then deleting it; a nanny that was about to lease it finds it
gone and extracts it again. Leftovers of nannies that died mid-way (a temporary
directory whose ``.<sha256>.lock`` nobody holds, an ``.evict-*`` directory) go too.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from trioscheduler.environments.cache import IN_USE, read_ready

logger = logging.getLogger("trioscheduler.environments")

MAX_COUNT_ENV = "TRIOSCHEDULER_ENV_CACHE_MAX_COUNT"
MAX_SIZE_ENV = "TRIOSCHEDULER_ENV_CACHE_MAX_SIZE"
DEFAULT_MAX_COUNT = 10
DEFAULT_MAX_SIZE = 20 * 2**30
_EVICT_LOCK = ".evict.lock"
_TEMPORARY = re.compile(r"\.([0-9a-f]{64})-.+")


@dataclass(frozen=True)
class Limits:
    """At most ``max_count`` entries and ``max_size`` bytes (None: no bound)."""

    max_count: int | None = DEFAULT_MAX_COUNT
    max_size: int | None = DEFAULT_MAX_SIZE

    @classmethod
    def resolve(
        cls, max_count: int | str | None = "default", max_size: int | str | None = "default"
    ) -> Limits:
        """``"default"``: the environment variable, else the default; 0 or None: no
        bound. ``max_size`` may be a string such as ``"20GiB"`` or ``"500MB"``."""
        if max_count == "default":
            max_count = os.environ.get(MAX_COUNT_ENV) or DEFAULT_MAX_COUNT
        if max_size == "default":
            max_size = os.environ.get(MAX_SIZE_ENV) or DEFAULT_MAX_SIZE
        try:
            count = int(max_count or 0)
            size = _parse_size(max_size)
        except ValueError:
            raise ValueError(
                f"environment cache limits: {max_count!r} entries / {max_size!r} bytes: use "
                "a whole number of entries and a size such as 20000000000, '20GiB' or "
                "'500MB' (0 or None: no bound)"
            ) from None
        if count < 0 or size < 0:
            raise ValueError(f"environment cache limits must not be negative: {count}, {size}")
        return cls(count or None, size or None)


def _parse_size(value: int | str | None) -> int:
    if value is None or isinstance(value, int):
        return int(value or 0)
    text = str(value).strip()
    if text.lower() in ("", "none"):
        return 0
    if text.isdigit():
        return int(text)
    from dask.utils import parse_bytes  # only for strings: a nanny need not import dask

    return int(parse_bytes(text))


@dataclass(frozen=True)
class _Entry:
    path: Path
    size: int
    last_use: float


def _entries(root: Path) -> list[_Entry]:
    found = []
    for path in root.iterdir():
        if path.name.startswith(".") or not path.is_dir():
            continue
        ready = read_ready(path)
        if ready is None:
            continue  # being made (under its lock), or left half-made: build() replaces it
        try:
            last_use = (path / IN_USE).stat().st_mtime
        except OSError:
            continue
        found.append(_Entry(path, int(ready.get("size") or 0), last_use))
    return sorted(found, key=lambda e: e.last_use)


def _try_remove(root: Path, entry: Path) -> bool:
    """Remove ``entry`` unless a lease holds it."""
    try:
        fd = os.open(entry / IN_USE, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # in use
        away = Path(tempfile.mkdtemp(prefix=".evict-", dir=root))
        os.rename(entry, away / "entry")  # under the lock: a late lessee sees it gone
    finally:
        os.close(fd)
    shutil.rmtree(away, ignore_errors=True)
    return True


def _remove_leftovers(root: Path) -> None:
    for path in root.iterdir():
        match = _TEMPORARY.fullmatch(path.name)
        if path.name.startswith(".evict-") and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)  # ours are removed at once: a dead one's
        elif match and path.is_dir():
            lock = root / f".{match.group(1)}.lock"
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a nanny is extracting it right now
            else:
                shutil.rmtree(path, ignore_errors=True)
            finally:
                os.close(fd)


def evict(root: str | os.PathLike[str], limits: Limits) -> list[str]:
    """Bring cache ``root`` within ``limits``, least recently used first; returns the
    names of the entries removed. Entries in use stay, even past the limits."""
    root = Path(root)
    try:
        lock = os.open(root / _EVICT_LOCK, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        return []
    removed: list[str] = []
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return removed  # another nanny is at it
        _remove_leftovers(root)
        entries = _entries(root)
        count, size = len(entries), sum(e.size for e in entries)
        for entry in entries:
            over_count = limits.max_count is not None and count > limits.max_count
            over_size = limits.max_size is not None and size > limits.max_size
            if not (over_count or over_size):
                break
            if _try_remove(root, entry.path):
                removed.append(entry.path.name)
                count, size = count - 1, size - entry.size
    finally:
        os.close(lock)
    if removed:
        logger.info(
            "environment cache %s: evicted %s (least recently used; limits: %s entries, %s bytes)",
            root, ", ".join(n[:12] for n in removed), limits.max_count, limits.max_size,
        )  # fmt: skip
    return removed
