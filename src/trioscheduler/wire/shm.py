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
import threading
import weakref
from collections.abc import Callable
from typing import Any, Final

import cloudpickle

from trioscheduler.core import shm_policy
from trioscheduler.errors import TrioSchedulerError

PREFIX: Final = "trioscheduler-"
_SEALS: Final = getattr(fcntl, "F_SEAL_SHRINK", 2) | getattr(fcntl, "F_SEAL_GROW", 4)
_SEAL_WRITE: Final = getattr(fcntl, "F_SEAL_WRITE", 8)


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


class _Mapping(mmap.mmap):
    """A copy-on-write mapping of a whole segment, with the descriptor it came from."""

    fd: int
    token: str
    nbytes: int
    created: bool


class _Registry:
    """This process's live mappings by start address (to recognise buffers inside them)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_start: dict[int, weakref.ref[_Mapping]] = {}
        self.owned = 0  # bytes of live segments this process created

    def add(self, m: _Mapping) -> int:
        start = _address(memoryview(m))
        assert start is not None
        with self.lock:
            self.by_start[start] = weakref.ref(m)
            if m.created:
                self.owned += m.nbytes
        weakref.finalize(m, self._drop, start, m.fd, m.nbytes if m.created else 0)
        return start

    def _drop(self, start: int, fd: int, owned: int) -> None:
        with self.lock:
            self.by_start.pop(start, None)
            self.owned -= owned
        try:
            os.close(fd)
        except OSError:
            pass

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


def owned_bytes() -> int:
    """Bytes of shared segments this process created and still holds."""
    return _registry.owned


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
    """A new sealed segment holding a copy of ``view``, mapped copy-on-write."""
    size = view.nbytes
    token = secrets.token_hex(8)
    fd = os.memfd_create(PREFIX + token, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size, flags=mmap.MAP_SHARED) as w:
            memoryview(w)[:] = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        try:  # immutable from now on (no shared writable mapping is left)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS | _SEAL_WRITE)
        except OSError:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        m = _Mapping(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    m.fd, m.token, m.nbytes, m.created = fd, token, size, True
    _registry.add(m)
    return m


Ref = tuple[str, int, int, str, int, int]  # host, pid, fd, token, offset, size


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
    ref = (HOST_ID, os.getpid(), m.fd, m.token, offset, nbytes)
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


# ----------------------------------------------------------------------- attaching


def attach(ref: Any) -> memoryview:
    """Map the bytes ``ref`` names (copy-on-write); raises ``SharedMemoryError``."""
    try:
        host, pid, fd, token, offset, size = ref
        if not (
            isinstance(host, str) and isinstance(token, str) and token.isalnum()
            and all(type(x) is int and x >= 0 for x in (pid, fd, offset, size))
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
        total = os.fstat(mine).st_size
        if offset + size > total or total == 0:
            raise SharedMemoryError(f"segment {token} has {total} bytes, not {offset + size}")
        m = _Mapping(mine, total, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(mine)
        raise
    m.fd, m.token, m.nbytes, m.created = mine, token, total, False
    _registry.add(m)
    return _slice(m, offset, size)


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
