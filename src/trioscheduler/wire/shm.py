"""Same-host transfers through shared memory: anonymous ``memfd`` segments, no names.

A large out-of-band buffer (numpy, pandas blocks, bytes: pickle protocol 5) is copied
once into a sealed ``memfd`` segment; the message carries only a reference ``(host, pid,
fd, token, offset, size)``. The receiver opens ``/proc/<pid>/fd/<fd>`` (a new descriptor
of the same segment), checks that it is the segment named by the token and sealed
against shrinking (so a mapping can never fault with SIGBUS), and maps it
copy-on-write: reading costs no copy, a write copies only the page written, and nobody
else sees it. The sender keeps using the segment too (its stored value is rebuilt on
the mapping: one copy per host), so a second transfer of the same value copies nothing.

Ownership: a segment is an anonymous file that lives exactly as long as some process
holds a descriptor or mapping of it. Nothing is ever created in ``/dev/shm`` or on
disk, so a ``kill -9`` of any process leaves nothing to clean up; the kernel frees the
segment when its last holder goes. Each mapping owns one descriptor, closed when the
mapping is garbage (``weakref.finalize``).

Nothing here is reached before the connection is trusted: a reference is resolved only
while unpickling a message, and the wire unpickles nothing before the handshake.
The decision *whether* to share is ``core.shm_policy``'s.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import pickle
import secrets
import struct
import threading
import weakref
from collections.abc import Callable
from typing import Any, Final

import cloudpickle

from trioscheduler.core import shm_policy
from trioscheduler.errors import TrioSchedulerError

PREFIX: Final = "trioscheduler-"
#: ``TRIOSCHEDULER_SHARED_MEMORY=0`` switches same-host shared memory off (workers, clients).
ENV: Final = "TRIOSCHEDULER_SHARED_MEMORY"
_SEALS: Final = getattr(fcntl, "F_SEAL_SHRINK", 2) | getattr(fcntl, "F_SEAL_GROW", 4)


class SharedMemoryError(TrioSchedulerError, OSError):
    """A shared-memory reference could not be resolved (sender gone, not this host...)."""


def _host_id() -> str | None:
    """Who may share memory with us: same boot, same pid namespace, same user."""
    if not hasattr(os, "memfd_create") or not hasattr(fcntl, "F_ADD_SEALS"):
        return None
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        pidns = os.stat("/proc/self/ns/pid").st_ino
        fd = os.memfd_create(PREFIX + "probe", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.close(fd)
    except OSError:
        return None
    return f"{boot}:{pidns}:{os.getuid()}"


#: This process's host identity for shared memory, ``None`` where it is unavailable.
HOST_ID: Final = _host_id()


def enabled_by_environment() -> bool:
    """Whether the environment leaves shared memory on (``TRIOSCHEDULER_SHARED_MEMORY``)."""
    return os.environ.get(ENV, "1").strip() not in ("0", "")


class _Mapping(mmap.mmap):
    """A copy-on-write mapping of a whole segment, with the descriptor it came from."""

    fd: int  # this mapping's own descriptor, closed with it
    shared_fd: int  # what other processes open to map the segment
    token: str
    generation: int
    nbytes: int  # the data area (the segment's size without its generation footer)


_FOOTER: Final = struct.Struct("<Q")  # the segment's generation, after its data area


class _Segment:
    """A segment this process created: its own descriptor (and, once reused, a writer).

    Reused for a later buffer once every other holder has let it go: each receiver
    holds a shared ``flock`` on its own descriptor for as long as it maps the segment,
    so an exclusive lock succeeds only when nobody else can see it (a killed holder's
    lock goes with it). A reuse bumps the generation in the footer; a reference to an
    older generation is refused, never read.

    The first fill writes with ``pwrite``: the kernel allocates the shared pages as it
    copies, without a page fault per page (3-4x faster than writing through a fresh
    mapping on a VM, where each fault is dear). A reuse copies through a writer mapping
    whose page tables are filled in one call (``MAP_POPULATE``, at the first reuse), so
    it costs a ``memcpy``. Both copies release the GIL (``pwrite``, numpy), so the
    event loop runs meanwhile.
    """

    __slots__ = ("capacity", "fd", "generation", "token", "writer")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.token = secrets.token_hex(8)
        self.generation = 0
        self.writer: mmap.mmap | None = None
        self.fd = os.memfd_create(PREFIX + self.token, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, capacity + _FOOTER.size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS)  # never shrinks under a reader
        except BaseException:
            os.close(self.fd)
            raise

    def fill(self, view: memoryview) -> None:
        self.generation += 1
        flat = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        if self.generation == 1:
            _pwrite_all(self.fd, flat)
        else:
            if self.writer is None:
                size = self.capacity + _FOOTER.size
                self.writer = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED | _POPULATE)
            _copy(memoryview(self.writer)[: flat.nbytes], flat)
        os.pwrite(self.fd, _FOOTER.pack(self.generation), self.capacity)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        os.close(self.fd)


_POPULATE: Final = getattr(mmap, "MAP_POPULATE", 0)
_CHUNK: Final = 1 << 30  # bytes per ``pwrite`` (one call writes at most ~2 GiB)


def _pwrite_all(fd: int, data: memoryview) -> None:
    done = 0
    while done < data.nbytes:
        done += os.pwrite(fd, data[done : done + _CHUNK], done)


def _copy(dst: memoryview, src: memoryview) -> None:
    """``dst[:] = src``, without the GIL where numpy is there to copy."""
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with the test dependencies
        dst[:] = src
        return
    numpy.frombuffer(dst, dtype=numpy.uint8)[:] = numpy.frombuffer(src, dtype=numpy.uint8)


class _Pool:
    """Segments this process created: in use (mapped by its own values) or free.

    Free segments are kept (their pages warm: a fresh shared page costs far more than
    copying into a used one) up to ``max_free`` segments and ``retain_bytes``.
    """

    def __init__(self, max_free: int = 4, retain_bytes: int = shm_policy.WARM_POOL_BYTES) -> None:
        self.lock = threading.RLock()  # finalizers may run inside, at any allocation
        self.free: list[_Segment] = []
        self.owned = 0  # bytes of every segment this process created and holds
        self.count = 0  # how many segments that is
        self.max_free = max_free
        self.retain_bytes = retain_bytes

    def take(self, view: memoryview) -> _Segment:
        n = view.nbytes
        seg: _Segment | None = None
        with self.lock:
            for candidate in list(self.free):
                if n <= candidate.capacity <= n + n // 8 + mmap.PAGESIZE and _exclusive(
                    candidate.fd
                ):
                    self.free.remove(candidate)
                    seg = candidate
                    break
        if seg is None:
            seg = _Segment(n)
            with self.lock:
                self.owned += seg.capacity
                self.count += 1
            seg.fill(view)
            return seg
        try:
            seg.fill(view)
        finally:
            fcntl.flock(seg.fd, fcntl.LOCK_UN)
        return seg

    def give_back(self, seg: _Segment) -> None:
        with self.lock:
            self.free.append(seg)
            drop: list[_Segment] = []
            kept = sum(s.capacity for s in self.free)
            while self.free and (len(self.free) > self.max_free or kept > self.retain_bytes):
                old = self.free.pop(0)
                kept -= old.capacity
                drop.append(old)
            self.owned -= sum(s.capacity for s in drop)
            self.count -= len(drop)
        for old in drop:
            old.close()

    def release(self) -> None:
        """Close every free segment (their pages go once no receiver maps them)."""
        with self.lock:
            drop, self.free = self.free, []
            self.owned -= sum(s.capacity for s in drop)
            self.count -= len(drop)
        for old in drop:
            old.close()


def _exclusive(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


class _Registry:
    """This process's live mappings by start address (to recognise buffers inside them)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()  # finalizers may run inside, at any allocation
        self.by_start: dict[int, weakref.ref[_Mapping]] = {}

    def add(self, m: _Mapping, segment: _Segment | None, adopted: int = 0) -> None:
        """Track ``m``; ``segment`` (ours) goes back to the pool when ``m`` is garbage,
        and ``adopted`` bytes (a segment handed to us) count as ours while ``m`` lives."""
        start = _address(memoryview(m))
        assert start is not None
        with self.lock:
            self.by_start[start] = weakref.ref(m)
        if adopted:
            with _pool.lock:
                _pool.owned += adopted
                _pool.count += 1
        weakref.finalize(m, self._drop, start, m.fd, segment, adopted)

    def _drop(self, start: int, fd: int, segment: _Segment | None, adopted: int) -> None:
        with self.lock:
            self.by_start.pop(start, None)
        try:
            os.close(fd)  # (a receiver's shared lock goes with its last descriptor)
        except OSError:
            pass
        if segment is not None:
            _pool.give_back(segment)
        if adopted:
            with _pool.lock:
                _pool.owned -= adopted
                _pool.count -= 1

    def find(self, addr: int, nbytes: int) -> tuple[_Mapping, int] | None:
        """The mapping holding ``[addr, addr + nbytes)`` and the offset in it, if any."""
        with self.lock:
            items = list(self.by_start.items())
        for start, ref in items:
            m = ref()
            if m is not None and start <= addr and addr + nbytes <= start + m.nbytes:
                return m, addr - start
        return None


_registry = _Registry()
_pool = _Pool()


def owned_bytes() -> int:
    """Bytes of shared segments this process created and still holds (in use or free)."""
    return _pool.owned


def free_bytes() -> int:
    """Bytes of the segments kept warm for reuse (no value of ours in them)."""
    with _pool.lock:
        return sum(s.capacity for s in _pool.free)


def owned_segments() -> int:
    """How many segments this process created and still holds (each costs descriptors)."""
    return _pool.count


def keep_warm(nbytes: int) -> None:
    """Keep up to ``nbytes`` of free segments warm for reuse (at least the default 256 MiB;
    the largest figure any caller in this process asked for)."""
    with _pool.lock:
        _pool.retain_bytes = max(_pool.retain_bytes, nbytes)


def release_segments() -> None:
    """Drop free segments kept for reuse (e.g. under memory pressure)."""
    _pool.release()


def rss_shared() -> int:
    """Resident shared-memory pages of this process (``RssShmem``), in bytes; 0 if unknown."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssShmem:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _address(view: memoryview) -> int | None:
    """Start address of a contiguous buffer, or None if it cannot be told."""
    try:
        if not view.readonly:
            return ctypes.addressof(ctypes.c_char.from_buffer(view))
        import numpy

        return int(numpy.frombuffer(view, dtype=numpy.uint8).ctypes.data)
    except Exception:
        return None


# ----------------------------------------------------------------------- exporting


def _create(view: memoryview) -> _Mapping:
    """``view`` copied into a segment (a free one if possible), mapped copy-on-write."""
    seg = _pool.take(view)
    try:
        fd = os.dup(seg.fd)
        try:
            m = _Mapping(fd, seg.capacity, flags=mmap.MAP_PRIVATE, prot=_RW)
        except BaseException:
            os.close(fd)
            raise
    except BaseException:
        _pool.give_back(seg)
        raise
    m.fd, m.shared_fd, m.token, m.generation = fd, seg.fd, seg.token, seg.generation
    m.nbytes = seg.capacity
    _registry.add(m, seg)
    return m


_RW: Final = mmap.PROT_READ | mmap.PROT_WRITE

Ref = tuple[str, int, int, str, int, int, int]  # host, pid, fd, token, generation, offset, size


def _export(view: memoryview) -> tuple[Ref, memoryview]:
    """A reference to ``view``'s bytes in a segment, and a view of them in that segment."""
    assert HOST_ID is not None
    nbytes = view.nbytes
    addr = _address(view)
    found = _registry.find(addr, nbytes) if addr is not None else None
    if found is not None:
        m, offset = found
    else:
        m, offset = _create(view), 0
    ref = (HOST_ID, os.getpid(), m.shared_fd, m.token, m.generation, offset, nbytes)
    return ref, memoryview(m)[offset : offset + nbytes]


class Shared:
    """A value pickled with its large buffers as shared-memory references.

    Put in a message instead of the value; the receiver unpickles the value itself,
    its large buffers mapped from the segments.
    """

    __slots__ = ("data", "parts", "shared_bytes")

    def __init__(self, data: bytes, parts: list[Any], shared_bytes: int) -> None:
        self.data = data
        self.parts = parts
        self.shared_bytes = shared_bytes

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return _load, (self.data, self.parts)


def _dumps(value: Any, buffers: list[pickle.PickleBuffer]) -> bytes:
    try:
        data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
        if b"__main__" not in data:
            return data
    except Exception:
        pass
    buffers.clear()
    data = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    return bytes(data)


def share(value: Any, threshold: int = shm_policy.SHM_MIN_BYTES) -> tuple[Any, Any]:
    """``(what to send, the value rebuilt on the segments or None)``.

    If no buffer of ``value`` reaches ``threshold`` the value itself is sent and nothing
    is rebuilt. Otherwise the large buffers are copied into segments (unless they
    already live in one), and the rebuilt value (same type, same contents, buffers in the
    segments) should replace the sender's own copy, so the host holds the bytes once.
    Runs in a thread: the first copy of a large buffer takes a while.
    """
    if HOST_ID is None:
        return value, None
    buffers: list[pickle.PickleBuffer] = []
    try:
        data = _dumps(value, buffers)
    except Exception:
        return value, None  # the wire reports what cannot be pickled
    views: list[memoryview | None] = []
    for pb in buffers:
        try:
            views.append(pb.raw())
        except BufferError:  # not contiguous: pickle it as it is
            views.append(None)
    if not any(v is not None and shm_policy.share_buffer(v.nbytes, threshold) for v in views):
        return value, None
    parts: list[Any] = []
    local: list[Any] = []
    shared = 0
    for pb, view in zip(buffers, views, strict=True):
        if view is not None and shm_policy.share_buffer(view.nbytes, threshold):
            ref, mine = _export(view)
            parts.append(ref)
            local.append(mine)
            shared += view.nbytes
        else:
            parts.append(pb)
            local.append(pb)
    rebuilt = pickle.loads(data, buffers=local)
    return Shared(data, parts, shared), rebuilt


def place(value: Any, threshold: int = shm_policy.SHM_MIN_BYTES) -> Any:
    """``value`` rebuilt with its large buffers in segments, or None if none is large.

    What a worker does to a task's result as it returns (in the task's thread), so that
    a later transfer to a process on this host is a mapping; the rebuilt value replaces
    the result, so the bytes are held once. A value that cannot be pickled is left as it
    is (None).
    """
    return share(value, threshold)[1]


# ----------------------------------------------------------------------- attaching


def attach(ref: Any, adopt: bool = False) -> memoryview:
    """Map the bytes ``ref`` names (copy-on-write); raises ``SharedMemoryError``.

    With ``adopt`` the segment was handed to this process (``hand_off``): its bytes
    count as this process's memory (``owned_bytes``) for as long as it maps them.
    """
    try:
        host, pid, fd, token, generation, offset, size = ref
        if not (
            isinstance(host, str) and isinstance(token, str) and token.isalnum()
            and all(type(x) is int and x >= 0 for x in (pid, fd, generation, offset, size))
        ):  # fmt: skip
            raise ValueError
    except (TypeError, ValueError):
        raise SharedMemoryError(f"malformed shared-memory reference {ref!r:.200}") from None
    if HOST_ID is None or host != HOST_ID:
        raise SharedMemoryError(
            "a peer sent a shared-memory reference from another host (or this process "
            "cannot use shared memory)"
        )
    try:
        mine = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SharedMemoryError(
            f"shared-memory segment {token} of process {pid} is gone: {e}"
        ) from None
    try:
        name = os.readlink(f"/proc/self/fd/{mine}")
        if name != f"/memfd:{PREFIX}{token} (deleted)":
            raise SharedMemoryError(f"process {pid}'s descriptor {fd} is not segment {token}")
        if not fcntl.fcntl(mine, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
            raise SharedMemoryError(f"segment {token} is not sealed against shrinking")
        if not _shared_lock(mine):  # held until this mapping's descriptors are closed
            raise SharedMemoryError(f"segment {token} is being rewritten (the sender let it go)")
        total = os.fstat(mine).st_size - _FOOTER.size
        if offset + size > total or total <= 0:
            raise SharedMemoryError(f"segment {token} has {total} bytes, not {offset + size}")
        (current,) = _FOOTER.unpack(os.pread(mine, _FOOTER.size, total))
        if current != generation:
            raise SharedMemoryError(f"segment {token} was reused (the sender let it go)")
        m = _Mapping(mine, total, flags=mmap.MAP_PRIVATE, prot=_RW)
    except BaseException:
        os.close(mine)
        raise
    m.fd, m.shared_fd, m.token, m.generation, m.nbytes = mine, mine, token, generation, total
    _registry.add(m, None, total if adopt else 0)
    return _slice(m, offset, size)


def _shared_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _slice(m: _Mapping, offset: int, size: int) -> memoryview:
    if offset + size > m.nbytes:
        raise SharedMemoryError(f"segment {m.token} has {m.nbytes} bytes, not {offset + size}")
    return memoryview(m)[offset : offset + size]


def _load(data: bytes, parts: list[Any]) -> Any:
    """Unpickle a ``Shared`` value on the receiving side (its references mapped)."""
    if not isinstance(parts, list):
        raise SharedMemoryError("malformed shared value")
    buffers = [p if not isinstance(p, tuple) else attach(p) for p in parts]
    return pickle.loads(data, buffers=buffers)


# ----------------------------------------------------------------------- handing off


class HandOff:
    """A value for one process on this host to take over: its pickle, with each large
    buffer copied into a new segment of its own (``hand_off``).

    ``message`` goes into the request (``[pickle, parts]``, a part being a reference or
    a small buffer); the receiver's ``adopt`` maps the segments and counts them as its
    memory. The sender keeps its own value (the user's) and ``close``s its descriptors
    once the receiver answered: a segment then lives exactly as long as the receiver
    maps it, and the sender's memory holds none of it.
    """

    __slots__ = ("message", "nbytes", "segments")

    def __init__(self, message: list[Any], segments: list[_Segment], nbytes: int) -> None:
        self.message = message
        self.segments = segments
        self.nbytes = nbytes

    def close(self) -> None:
        segments, self.segments = self.segments, []
        for seg in segments:
            seg.close()


def hand_off(value: Any, threshold: int = shm_policy.SHM_MIN_BYTES) -> HandOff | None:
    """``value`` pickled with its large buffers copied into new segments, or None if no
    buffer reaches ``threshold`` (or ``value`` cannot be pickled: the wire says why).

    The copy is ``pwrite`` into a new ``memfd`` (the kernel allocates the pages as it
    copies; the GIL is released), so it can run in a thread beside the hashing of the
    key. A segment is never reused by the sender: the receiver owns it from then on.
    """
    if HOST_ID is None:
        return None
    buffers: list[pickle.PickleBuffer] = []
    try:
        data = _dumps(value, buffers)
    except Exception:
        return None
    views: list[memoryview | None] = []
    for pb in buffers:
        try:
            views.append(pb.raw())
        except BufferError:  # not contiguous: sent as bytes
            views.append(None)
    if not any(v is not None and shm_policy.share_buffer(v.nbytes, threshold) for v in views):
        return None
    parts: list[Any] = []
    out = HandOff([data, parts], [], 0)
    try:
        for pb, view in zip(buffers, views, strict=True):
            if view is not None and shm_policy.share_buffer(view.nbytes, threshold):
                seg = _Segment(view.nbytes)
                out.segments.append(seg)
                seg.fill(view)
                parts.append(
                    (HOST_ID, os.getpid(), seg.fd, seg.token, seg.generation, 0, view.nbytes)
                )
                out.nbytes += view.nbytes
            else:
                parts.append(view if view is not None else memoryview(pb).tobytes())
    except BaseException:
        out.close()
        raise
    return out


def adopt(message: Any) -> Any:
    """The value a process on this host handed us (``HandOff.message``), its large
    buffers mapped copy-on-write from the sender's segments, which from now on count
    as this process's memory; raises ``SharedMemoryError`` if a segment cannot be
    mapped (the sender then sends the value through the socket)."""
    try:
        data, parts = message
    except (TypeError, ValueError):
        raise SharedMemoryError("malformed handed-off value") from None
    if not isinstance(data, (bytes, bytearray, memoryview)) or not isinstance(parts, list):
        raise SharedMemoryError("malformed handed-off value")
    buffers = [attach(p, adopt=True) if isinstance(p, tuple) else p for p in parts]
    return pickle.loads(data, buffers=buffers)


def segments_of(pid: int) -> set[str]:
    """Tokens of our segments process ``pid`` holds (descriptors or mappings); for tests."""
    tokens: set[str] = set()
    needle = f"/memfd:{PREFIX}"
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                name = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if name.startswith(needle):
                tokens.add(name[len(needle) :].split(" ")[0])
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                at = line.find(needle)
                if at >= 0:
                    tokens.add(line[at + len(needle) :].split(" ")[0].strip())
    except OSError:
        pass
    tokens.discard("probe")
    return tokens
