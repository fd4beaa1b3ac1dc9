"""A worker's managed data: values in memory over a store of spill files on disk.

The worker core decides *what* to spill and when (LRU under the target/spill thresholds,
pause above the pause threshold); this module only carries the decisions out. That is
why there is no ``zict.Buffer`` here: a buffer with its own LRU would make the same
decision a second time, behind the core's back. The disk side is one file per key
holding a pickle protocol 5 stream plus its out-of-band buffers as separate frames, so a
numpy array or a bytes object goes to disk without being copied into the pickle and
comes back byte-identical; large files bypass the page cache (``O_DIRECT``, see
``spill_file``). A value read back into memory keeps its spill file (values
are immutable once stored), so spilling it again only drops the in-memory reference;
the file goes when the key is deleted or given a new value. A value that cannot be
pickled stays in memory; the first such value warns once (``TrioSchedulerWarning``),
later ones only log.

Disk writes can run in a thread (``begin_spill`` / ``write_spills`` / ``finish_spill``)
so that the worker's loop keeps moving messages and starting tasks meanwhile; the value
stays readable until its file is complete.

``parse_memory_limit`` turns the user's ``memory_limit`` into bytes, as dask does.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import psutil

from trioscheduler.errors import TrioSchedulerWarning
from trioscheduler.server.spill_file import read_value, serialize, write_frames

logger = logging.getLogger("trioscheduler.memory")

# dask's thresholds, as fractions of the memory limit.
TARGET = 0.6  # managed bytes above this: spill by LRU
SPILL = 0.7  # process memory (RSS) above this: spill
PAUSE = 0.8  # process memory above this: start no new tasks
TERMINATE = 0.95  # process memory above this: the nanny restarts the worker
WRITE_AHEAD = 0.1  # the worker core starts no task while more than this is unwritten
TRANSFER = 0.1  # dask's distributed.worker.memory.transfer: bytes in flight to a worker
SPILL_BATCH = 4 << 20  # small spill files go to the writer thread up to this many bytes at once


def system_memory() -> int:
    """Memory this process may use: physical memory, or the cgroup limit when lower."""
    total = int(psutil.virtual_memory().total)
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
        break
    return total


def parse_memory_limit(memory_limit: str | float | None, *, nworkers: int = 1) -> int | None:
    """``memory_limit`` in bytes, or ``None`` for no limit.

    ``"auto"``: system memory divided among the ``nworkers`` workers of this host; an int
    or a byte string (``"2GiB"``, ``"500MB"``): that many bytes; a number ``0 < x <= 1``
    (or its string): that fraction of system memory; ``0``/``None``: no limit. A limit
    above system memory is lowered to it, with a log line, as dask does.
    """
    if memory_limit is None:
        return None
    total = system_memory()
    limit: float
    if isinstance(memory_limit, str):
        text = memory_limit.strip().lower()
        if text == "auto":
            limit = total // max(1, nworkers)
        else:
            try:
                limit = float(text)
            except ValueError:
                from dask.utils import parse_bytes  # here: a worker need not import dask

                try:
                    limit = parse_bytes(text)
                except ValueError:
                    raise ValueError(
                        f"memory_limit {memory_limit!r} is not understood: use 'auto', a number "
                        "of bytes, a string like '2GiB' or '500MB', a fraction of system memory "
                        "like 0.5, or 0/None for no limit"
                    ) from None
    elif isinstance(memory_limit, bool) or not isinstance(memory_limit, int | float):
        raise TypeError(
            f"memory_limit must be a str, a number or None, not {type(memory_limit).__name__}"
        )
    else:
        limit = memory_limit
    if limit < 0:
        raise ValueError(f"memory_limit must not be negative, got {memory_limit!r}")
    if 0 < limit <= 1:
        limit = limit * total  # a fraction of system memory (1 means all of it, as in dask)
    result = int(limit)
    if result == 0:
        return None
    if result > total:
        from dask.utils import format_bytes

        logger.warning(
            "memory_limit %r is more than this machine's memory (%s); using %s instead",
            memory_limit, format_bytes(total), format_bytes(total),
        )  # fmt: skip
        return total
    return result


def incoming_bytes_limit(setting: str | int | None, memory_limit: int | None) -> int | None:
    """The worker's ``transfer_incoming_bytes_limit`` in bytes, or None for none.

    ``"auto"`` (the default): ``TRANSFER`` of the memory limit, as dask's worker (no
    memory limit, no byte limit); a number of bytes or a byte string: that; None: none.
    """
    if setting is None:
        return None
    if isinstance(setting, str):
        if setting.strip().lower() == "auto":
            return int(memory_limit * TRANSFER) if memory_limit else None
        from dask.utils import parse_bytes  # here: a worker need not import dask

        setting = parse_bytes(setting)
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ValueError(
            f"transfer_incoming_bytes_limit must be 'auto', a number of bytes >= 0, a byte "
            f"string like '100MB', or None for no limit; got {setting!r}"
        )
    return setting


# --------------------------------------------------------------------------------------
# Spill files
# --------------------------------------------------------------------------------------


class UnpicklableValue(Exception):
    """A value could not be serialized for its spill file; ``error`` says why."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class SpillJob:
    """One value on its way to disk: written in a thread (``write_spills``), booked on
    the store's owner thread (``DataStore.finish_spill``)."""

    __slots__ = ("error", "key", "nbytes", "path", "size", "value")

    def __init__(self, key: Any, value: Any, path: str, nbytes: int) -> None:
        self.key = key
        self.value = value
        self.path = path
        self.nbytes = nbytes  # the size the core booked (batches writes by it)
        self.size = 0  # bytes on disk, once written
        self.error: BaseException | None = None  # UnpicklableValue or OSError


def write_spills(jobs: list[SpillJob], remove: list[str] | None = None) -> None:
    """Remove the files in ``remove``, then write the jobs' files (any thread; never
    raises: errors land on ``job.error``)."""
    for path in remove or ():
        try:
            _remove(path)
        except OSError as exc:
            logger.warning("could not remove spill file %s: %r", path, exc)
    for job in jobs:
        try:
            job.size = DataStore.dump(job.value, job.path)
        except (UnpicklableValue, OSError) as exc:
            job.error = exc


_MISSING: Any = object()


class DataStore(Mapping[Any, Any]):
    """Managed data of one worker: ``memory`` (a dict) over spill files in ``directory``.

    Reading a spilled key (``store[key]``, e.g. a peer's ``get_data``) loads a copy
    without unspilling it, unless the core asked for it back (``want``): then the first
    read, usually by the task thread gathering the task's inputs, puts it in ``memory``.

    Spilling has two phases so that the disk write runs off the owner's loop:
    ``begin_spill`` moves the value from ``memory`` to ``writing`` (it is still served
    from there), a thread runs ``write_spills``, and ``finish_spill`` books the file in
    ``spilled``, or removes it if the key was deleted, replaced or wanted back meanwhile.
    ``spill``/``unspill`` do the same synchronously.

    ``spilled`` holds the keys that live only on disk; ``kept`` the keys in ``memory`` whose
    spill file is still valid (they were unspilled), so a later ``spill`` writes nothing.
    ``spilled_bytes`` counts only ``spilled``; ``kept_bytes`` the kept files;
    ``writing_bytes`` the booked sizes of the values being written. One lock guards the
    maps: the owner changes them, task threads read them and book wanted keys.
    """

    __slots__ = (
        "_counter",
        "_lock",
        "_owns_directory",
        "_warned",
        "directory",
        "kept",
        "kept_bytes",
        "memory",
        "remove",
        "spilled",
        "spilled_bytes",
        "wanted",
        "writing",
        "writing_bytes",
    )

    def __init__(self, local_directory: str | None = None, *, prefix: str = "worker-") -> None:
        base = local_directory or tempfile.gettempdir()
        os.makedirs(base, exist_ok=True)
        self.directory = tempfile.mkdtemp(prefix=prefix, dir=base)
        self._owns_directory = True
        self.memory: dict[Any, Any] = {}
        self.spilled: dict[Any, tuple[str, int]] = {}  # key -> (file path, bytes on disk)
        self.spilled_bytes = 0
        self.kept: dict[Any, tuple[str, int]] = {}  # in-memory key -> its still-valid file
        self.kept_bytes = 0
        self.writing: dict[Any, SpillJob] = {}  # key -> its value being written
        self.writing_bytes = 0
        self.wanted: set[Any] = set()  # spilled keys the core has booked back in memory
        self._lock = threading.Lock()
        # How a file that is no longer needed goes: at once here; the worker hands the
        # paths to its writer thread instead (unlinking 100 MB takes milliseconds).
        self.remove: Callable[[str], None] = _remove
        self._counter = 0
        self._warned = False

    # Mapping protocol ------------------------------------------------------------------

    def __getitem__(self, key: Any) -> Any:
        lock = self._lock
        for _ in range(3):
            with lock:
                value = self.memory.get(key, _MISSING)
                if value is not _MISSING:
                    return value
                job = self.writing.get(key)
                if job is not None:
                    return job.value
                entry = self.spilled.get(key)
                if entry is None:
                    raise KeyError(key)
            try:
                value = read_value(entry[0])
            except FileNotFoundError:
                continue  # unspilled or deleted meanwhile: look again
            with lock:
                if key in self.wanted and self.spilled.get(key) is entry:
                    self._to_memory(key, value, entry)
            return value
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return key in self.memory or key in self.writing or key in self.spilled

    def __iter__(self) -> Iterator[Any]:
        with self._lock:
            keys = [*self.memory, *self.writing, *self.spilled]
        yield from keys

    def __len__(self) -> int:
        return len(self.memory) + len(self.writing) + len(self.spilled)

    def get_in_memory(self, key: Any) -> Any:
        """``key``'s value if it needs no disk read (in memory or being written), else
        a sentinel that is not any value: compare with ``is_missing``."""
        with self._lock:
            value = self.memory.get(key, _MISSING)
            if value is _MISSING:
                job = self.writing.get(key)
                if job is not None:
                    value = job.value
            return value

    @staticmethod
    def is_missing(value: Any) -> bool:
        return value is _MISSING

    # What the worker shell calls -------------------------------------------------------

    def put(self, key: Any, value: Any) -> None:
        """Store a value in memory (a new result, a fetched or scattered value)."""
        with self._lock:
            self._forget(key)
            self.memory[key] = value

    def replace(self, key: Any, old: Any, new: Any) -> bool:
        """Swap ``key``'s in-memory value ``old`` for ``new`` (an equal value, e.g. one
        rebuilt on shared memory), unless it changed meanwhile; False then."""
        with self._lock:
            if self.memory.get(key, _MISSING) is not old:
                return False
            self.memory[key] = new
            return True

    def spill(self, key: Any) -> bool:
        """Move ``key`` to disk now. False if its value cannot be pickled (it stays).

        A key unspilled earlier still has its file: it only leaves memory, nothing is written.
        """
        job = self.begin_spill(key, 0)
        if job is None:
            return True
        write_spills([job])
        error = self.finish_spill(job)
        if isinstance(error, OSError):
            raise error
        return error is None

    def begin_spill(self, key: Any, nbytes: int) -> SpillJob | None:
        """Take ``key`` out of memory; the job to write, or None if nothing is to be
        written (already on disk, its kept file reused, or unknown). Owner's thread."""
        with self._lock:
            self.wanted.discard(key)
            if key in self.spilled or key in self.writing:
                return None
            value = self.memory.get(key, _MISSING)
            if value is _MISSING:
                return None
            entry = self.kept.pop(key, None)
            if entry is not None:
                self.kept_bytes -= entry[1]
                self.spilled[key] = entry
                self.spilled_bytes += entry[1]
                del self.memory[key]
                return None
            self._counter += 1
            path = os.path.join(self.directory, f"{self._counter}.spill")
            job = self.writing[key] = SpillJob(key, value, path, nbytes)
            self.writing_bytes += nbytes
            del self.memory[key]
            return job

    def finish_spill(self, job: SpillJob) -> BaseException | None:
        """Book a written job (owner's thread); the error to report to the core, if any.

        A key deleted, replaced or wanted back while its file was written is not
        reported: its file is removed, or kept when the same value is back in memory.
        """
        key, value = job.key, job.value
        job.value = None  # the write is over: memory is freed once ``writing`` lets go
        remove = False
        with self._lock:
            if self.writing.get(key) is job:
                del self.writing[key]
                self.writing_bytes -= job.nbytes
                if job.error is not None:
                    self.memory[key] = value
                else:
                    self.spilled[key] = (job.path, job.size)
                    self.spilled_bytes += job.size
            elif job.error is None:
                if self.memory.get(key, _MISSING) is value and key not in self.kept:
                    self.kept[key] = (job.path, job.size)
                    self.kept_bytes += job.size
                else:
                    remove = True
            else:
                return None
        if remove:
            self.remove(job.path)
            return None
        error = job.error
        if isinstance(error, UnpicklableValue):
            self.unpicklable(key, value, error.error)
        return error

    def want(self, key: Any) -> None:
        """The core booked ``key`` back in memory: the next read loads it into ``memory``
        (a value still being written goes back at once, its write is dropped)."""
        with self._lock:
            job = self.writing.pop(key, None)
            if job is not None:
                self.writing_bytes -= job.nbytes
                self.memory[key] = job.value
            elif key in self.spilled:
                self.wanted.add(key)

    def unspill(self, key: Any) -> Any:
        """Load ``key`` from disk back into memory now and return its value."""
        self.want(key)
        return self[key]

    @staticmethod
    def dump(value: Any, path: str) -> int:
        """Write ``value`` to ``path``; its size on disk. ``UnpicklableValue``, ``OSError``."""
        try:
            kind, frames = serialize(value)
        except Exception as exc:
            raise UnpicklableValue(exc) from exc
        try:
            return write_frames(path, kind, frames)
        except BaseException:
            _remove(path)
            raise

    def delete(self, key: Any) -> None:
        """Forget ``key`` wherever it is; unknown keys are ignored. A file being written
        for it is removed when its write finishes (``finish_spill``)."""
        with self._lock:
            self.memory.pop(key, None)
            self._forget(key)

    def close(self) -> None:
        """Drop every value and remove the spill directory."""
        with self._lock:
            self.memory.clear()
            self.spilled.clear()
            self.spilled_bytes = 0
            self.kept.clear()
            self.kept_bytes = 0
            self.writing.clear()
            self.writing_bytes = 0
            self.wanted.clear()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    # internals (with the lock held) ----------------------------------------------------

    def _to_memory(self, key: Any, value: Any, entry: tuple[str, int]) -> None:
        self.memory[key] = value
        del self.spilled[key]
        self.spilled_bytes -= entry[1]
        self.kept[key] = entry
        self.kept_bytes += entry[1]
        self.wanted.discard(key)

    def _forget(self, key: Any) -> None:
        """Drop ``key``'s files and pending write (not its ``memory`` entry)."""
        self.wanted.discard(key)
        job = self.writing.pop(key, None)
        if job is not None:
            self.writing_bytes -= job.nbytes
        entry = self.spilled.pop(key, None)
        if entry is not None:
            self.spilled_bytes -= entry[1]
            self.remove(entry[0])
        entry = self.kept.pop(key, None)
        if entry is not None:
            self.kept_bytes -= entry[1]
            self.remove(entry[0])

    def unpicklable(self, key: Any, value: Any, exc: BaseException) -> None:
        """Report a value that cannot be spilled: one warning per store, then log lines."""
        text = (
            f"the value of {key!r} (a {type(value).__name__}) cannot be pickled, so it "
            f"cannot be spilled to disk and stays in memory ({type(exc).__name__}: {exc}). "
            "Return picklable values from tasks to let the worker spill them; further "
            "unpicklable values on this worker are only logged."
        )
        if self._warned:
            logger.info(text)
            return
        self._warned = True
        warnings.warn(text, TrioSchedulerWarning, stacklevel=4)
