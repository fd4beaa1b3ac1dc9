"""A worker's managed data: values in memory over a store of spill files on disk.

The worker core decides *what* to spill and when (LRU under the target/spill thresholds,
pause above the pause threshold); this module only carries the decisions out. That is
why there is no ``zict.Buffer`` here: a buffer with its own LRU would make the same
decision a second time, behind the core's back. The disk side is one file per key
holding a pickle protocol 5 stream plus its out-of-band buffers as separate frames, so a
numpy array or a bytes object goes to disk without being copied into the pickle and
comes back byte-identical. A value read back into memory keeps its spill file (values
are immutable once stored), so spilling it again only drops the in-memory reference;
the file goes when the key is deleted or given a new value. A value that cannot be pickled stays in memory; the first
such value warns once (``TrioSchedulerWarning``), later ones only log.

``parse_memory_limit`` turns the user's ``memory_limit`` into bytes, as dask does.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import cloudpickle
import psutil
from dask.utils import format_bytes, parse_bytes

from trioscheduler.errors import TrioSchedulerWarning

logger = logging.getLogger("trioscheduler.memory")

# dask's thresholds, as fractions of the memory limit.
TARGET = 0.6  # managed bytes above this: spill by LRU
SPILL = 0.7  # process memory (RSS) above this: spill
PAUSE = 0.8  # process memory above this: start no new tasks
TERMINATE = 0.95  # process memory above this: the nanny restarts the worker


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
        logger.warning(
            "memory_limit %r is more than this machine's memory (%s); using %s instead",
            memory_limit, format_bytes(total), format_bytes(total),
        )  # fmt: skip
        return total
    return result


# --------------------------------------------------------------------------------------
# Spill files
# --------------------------------------------------------------------------------------

_HEAD = struct.Struct("<BI")  # kind, number of frames; then one <Q length per frame
_PICKLE, _BYTES, _BYTEARRAY = 0, 1, 2


def serialize(value: Any) -> tuple[int, list[memoryview | bytes]]:
    """``(kind, frames)`` for a spill file, never copying a large buffer.

    ``bytes``/``bytearray`` are written raw (pickle would copy them into its stream);
    anything else is pickle protocol 5 with out-of-band buffers, so a numpy array's
    data is one frame of its own. Plain pickle first (fast, exact), cloudpickle for what
    it refuses (lambdas, classes defined in ``__main__``). Raises what pickling raises.
    """
    kind = type(value)
    if kind is bytes:
        return _BYTES, [value]
    if kind is bytearray:
        return _BYTEARRAY, [memoryview(value)]
    buffers: list[pickle.PickleBuffer] = []
    try:
        head = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    except Exception:
        buffers.clear()
        head = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    frames: list[memoryview | bytes] = [head]
    frames.extend(b.raw() for b in buffers)  # contiguous views of the buffers
    return _PICKLE, frames


def write_frames(path: str, kind: int, frames: list[memoryview | bytes]) -> int:
    """Write serialized frames to a new spill file at ``path``; return the bytes written."""
    lengths = [memoryview(f).nbytes for f in frames]
    header = _HEAD.pack(kind, len(frames)) + struct.pack(f"<{len(frames)}Q", *lengths)
    with open(path, "wb") as f:
        f.write(header)
        for frame in frames:
            f.write(frame)
    return len(header) + sum(lengths)


def read_value(path: str) -> Any:
    """The value in a spill file; buffers are read straight into their final memory."""
    with open(path, "rb", buffering=0) as f:
        kind, count = _HEAD.unpack(f.read(_HEAD.size))
        lengths = struct.unpack(f"<{count}Q", f.read(8 * count))
        if kind == _BYTES:
            data = f.readall()
            if len(data) != lengths[0]:
                raise OSError(f"spill file {path} is truncated")
            return data
        body = bytearray(sum(lengths))
        view = memoryview(body)
        done = 0
        while done < len(body):
            n = f.readinto(view[done:])
            if not n:
                raise OSError(f"spill file {path} is truncated")
            done += n
    if kind == _BYTEARRAY:
        return body
    frames = []
    start = 0
    for n in lengths:
        frames.append(view[start : start + n])
        start += n
    return pickle.loads(frames[0], buffers=frames[1:])


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


class DataStore(Mapping[Any, Any]):
    """Managed data of one worker: ``memory`` (a dict) over spill files in ``directory``.

    Reading a spilled key (``store[key]``, e.g. a peer's ``get_data``) loads a copy
    without unspilling it: only the core moves keys between memory and disk. Safe to
    read from task threads while the worker's loop spills or unspills (a read that loses
    the race to a delete finds the value gone, or in memory, on its retry).

    ``spilled`` holds the keys that live only on disk; ``kept`` the keys in ``memory`` whose
    spill file is still valid (they were unspilled), so a later ``spill`` writes nothing.
    ``spilled_bytes`` counts only ``spilled``; ``kept_bytes`` the kept files.
    """

    __slots__ = (
        "_counter",
        "_owns_directory",
        "_warned",
        "directory",
        "kept",
        "kept_bytes",
        "memory",
        "spilled",
        "spilled_bytes",
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
        self._counter = 0
        self._warned = False

    # Mapping protocol ------------------------------------------------------------------

    def __getitem__(self, key: Any) -> Any:
        for _ in range(3):
            try:
                return self.memory[key]
            except KeyError:
                pass
            entry = self.spilled.get(key)
            if entry is None:
                if key in self.memory:
                    continue
                raise KeyError(key)
            try:
                return read_value(entry[0])
            except FileNotFoundError:
                continue  # unspilled or deleted meanwhile: look again
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return key in self.memory or key in self.spilled

    def __iter__(self) -> Iterator[Any]:
        yield from list(self.memory)
        yield from list(self.spilled)

    def __len__(self) -> int:
        return len(self.memory) + len(self.spilled)

    # What the worker shell calls -------------------------------------------------------

    def put(self, key: Any, value: Any) -> None:
        """Store a value in memory (a new result, a fetched or scattered value)."""
        if key in self.spilled:
            self._remove_file(key)
        if key in self.kept:
            self._remove_kept(key)  # the file holds the old value
        self.memory[key] = value

    def spill(self, key: Any) -> bool:
        """Move ``key`` to disk now. False if its value cannot be pickled (it stays).

        A key unspilled earlier still has its file: it only leaves memory, nothing is written.
        """
        if key in self.spilled:
            return True
        value = self.memory[key]
        entry = self.kept.pop(key, None)
        if entry is not None:
            self.kept_bytes -= entry[1]
            self.spilled[key] = entry
            self.spilled_bytes += entry[1]
            del self.memory[key]
            return True
        path = self.new_path()
        try:
            size = self.dump(value, path)
        except UnpicklableValue as exc:
            self.unpicklable(key, value, exc.error)
            return False
        return self.commit_spill(key, value, path, size)

    def unspill(self, key: Any) -> Any:
        """Load ``key`` from disk back into memory now and return its value."""
        if key in self.memory:
            return self.memory[key]
        path, value = self.load(key)
        self.commit_unspill(key, path, value)
        return value

    # Two-phase spilling, so that the disk I/O can run in a thread: ``dump``/``load`` touch
    # only files (thread-safe); the ``commit_*`` steps change the maps, on the owner's
    # thread, and check that nothing changed the key meanwhile.

    def new_path(self) -> str:
        self._counter += 1
        return os.path.join(self.directory, f"{self._counter}.spill")

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

    def commit_spill(self, key: Any, value: Any, path: str, size: int) -> bool:
        """``key`` now lives in ``path``, unless it changed while being written."""
        if key in self.memory and self.memory[key] is value and key not in self.spilled:
            if key in self.kept:
                self._remove_kept(key)  # superseded by the file just written
            self.spilled[key] = (path, size)
            self.spilled_bytes += size
            del self.memory[key]
            return True
        _remove(path)
        return False

    def load(self, key: Any) -> tuple[str, Any]:
        """``(path, value)`` of a spilled key, read from disk (``KeyError`` if not spilled)."""
        path = self.spilled[key][0]
        return path, read_value(path)

    def commit_unspill(self, key: Any, path: str, value: Any) -> bool:
        """Put a loaded value back in memory, unless the key changed meanwhile.

        The file stays (in ``kept``), for the next time the key is spilled.
        """
        entry = self.spilled.get(key)
        if entry is None or entry[0] != path:
            return False
        self.memory[key] = value
        del self.spilled[key]
        self.spilled_bytes -= entry[1]
        self.kept[key] = entry
        self.kept_bytes += entry[1]
        return True

    def delete(self, key: Any) -> None:
        """Forget ``key`` wherever it is; unknown keys are ignored."""
        self.memory.pop(key, None)
        if key in self.spilled:
            self._remove_file(key)
        if key in self.kept:
            self._remove_kept(key)

    def close(self) -> None:
        """Drop every value and remove the spill directory."""
        self.memory.clear()
        self.spilled.clear()
        self.spilled_bytes = 0
        self.kept.clear()
        self.kept_bytes = 0
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    # internals -------------------------------------------------------------------------

    def _remove_file(self, key: Any) -> None:
        path, size = self.spilled.pop(key)
        self.spilled_bytes -= size
        _remove(path)

    def _remove_kept(self, key: Any) -> None:
        path, size = self.kept.pop(key)
        self.kept_bytes -= size
        _remove(path)

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
        warnings.warn(text, TrioSchedulerWarning, stacklevel=3)
