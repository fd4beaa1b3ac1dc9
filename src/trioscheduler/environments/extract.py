"""Extracting an archive that came over the network without trusting it, quickly.

Every member is checked by string rules before anything is written, the same on every
Python (``tarfile``'s ``"data"`` filter is missing on 3.11.0-3.11.3, Debian 12's
3.11.2, and it resolves every member's path with ``realpath``, a few ``lstat`` per
member): every member lies under ``env/``; no ``..`` or absolute path; no device, FIFO
or other special file; symlinks are relative and stay inside the environment; nothing
is written beneath a link of the archive's own; hard links name an earlier member;
setuid/setgid/sticky bits and group/other write bits are dropped and ownership is
ignored, as the data filter does. These string rules suffice because the destination
is a fresh, empty directory: nothing in it but what the archive made.

Why not ``tarfile.extractall``: on this project's machines creating files is what an
environment of 9,000 files costs (the kernel's inode allocation; ``tar xf`` spends 80 %
of its time in ``openat``), and ``extractall`` creates them one at a time in the thread
that also inflates the archive. Here the inflating thread hands small files to a few
writer threads (their system calls release the GIL), and writes each file by its file
descriptor (open, write, fchmod, futimens, close: no path lookups after the open).
"""

from __future__ import annotations

import os
import posixpath
import tarfile
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any, Protocol, cast

from trioscheduler.environments.errors import UnsafeArchiveError
from trioscheduler.environments.manifest import ROOT

WRITERS = 2
"""Writer threads; more did not help on 2 cores (the kernel's share is the limit)."""
INLINE = 1 << 20
"""Files bigger than this are written by the inflating thread itself, in pieces."""
IN_FLIGHT = 64 << 20
"""Bytes read but not yet written that the writer threads may hold."""


class Readable(Protocol):
    def read(self, n: int, /) -> bytes: ...


_OPEN = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW


def safe_extract(source: str | os.PathLike[str] | Readable, dest: str | os.PathLike[str]) -> int:
    """Extract tar.gz ``source`` (a path or a binary stream) into the empty directory
    ``dest``, or raise ``UnsafeArchiveError``; returns the bytes of the files written.

    One forward pass (a stream cannot be re-read): each member is checked just before
    it is written; on an error the caller removes ``dest``.
    """
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as raw:
            return safe_extract(raw, dest)
    with (
        tarfile.open(fileobj=cast("IO[bytes]", _Inflated(source)), mode="r:") as tar,
        _Writer(os.fspath(dest)) as writer,
    ):
        seen: set[str] = set()
        links: set[str] = set()
        for ti in tar:
            _check_root(ti)
            _check_member(ti, seen, links)
            writer.member(tar, ti)
        return writer.total


class _Inflated:
    """The inflated bytes of a gzip stream, read forward only: what tarfile's ``"r:"``
    mode uses (``read``, ``tell``, ``seek`` to here or later). One raw-deflate object over
    1 MiB reads, where ``gzip.GzipFile`` stacks three Python layers over 8 KiB reads; and
    no CRC-32 of the 380 MB it inflates (9 % of the instructions of an extraction): the
    caller checks the sha256 of the compressed bytes, which covers them."""

    def __init__(self, raw: Readable) -> None:
        self._raw = raw
        self._buffer = bytearray()
        self._pos = 0  # bytes handed out so far
        self._inflate: Any = None  # a raw-deflate object, once past a member's header
        self._pending = b""  # compressed bytes not yet inflated
        self._end = False

    def _feed(self) -> bool:
        """Inflate some more into the buffer; False at the end of the stream."""
        while not self._end:
            data = self._pending or self._raw.read(INLINE)
            self._pending = b""
            if self._inflate is None:
                if not data:
                    self._end = True
                    return False
                body = self._header(data)
                if not body:
                    continue  # more of the header to read (None), or nothing after it yet
                data = body
            if not data:
                raise tarfile.ReadError("the archive ends in the middle of its gzip stream")
            out = self._inflate.decompress(data)
            if self._inflate.eof:  # a member ends: its 8-byte trailer, then maybe another
                rest = self._inflate.unused_data
                while len(rest) < 8 and (more := self._raw.read(INLINE)):
                    rest += more
                self._pending, self._inflate = rest[8:], None
                if not self._pending.startswith(_GZIP_MAGIC):
                    self._end = True  # padding after the last member, as tar leaves it
            if out:
                self._buffer += out
                return True
        return False

    def _header(self, data: bytes) -> bytes | None:
        """Skip a gzip member header at the start of ``data``; None: read more first."""
        if len(data) >= 2 and not data.startswith(_GZIP_MAGIC):
            raise tarfile.ReadError("not a gzip stream (made by `trioscheduler pack-env`?)")
        size = _header_size(data)
        if size is None:
            more = self._raw.read(INLINE)
            if not more:
                raise tarfile.ReadError("the archive ends inside a gzip header")
            self._pending = data + more
            return None
        self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        return data[size:]

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            while self._feed():
                pass
            n = len(self._buffer)
        while len(self._buffer) < n and self._feed():
            pass
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        self._pos += len(data)
        return data

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0 or offset < self._pos:
            raise tarfile.ReadError("the archive is read forward only")
        while self._pos < offset:
            if not self.read(min(offset - self._pos, INLINE)):
                raise tarfile.ReadError("unexpected end of data")
        return self._pos


_GZIP_MAGIC = b"\x1f\x8b"


def _header_size(data: bytes) -> int | None:
    """The length of the gzip member header at the start of ``data`` (RFC 1952), or None
    when ``data`` ends inside it."""
    if len(data) < 10:
        return None
    if data[2] != 8:
        raise tarfile.ReadError(f"unknown gzip compression method {data[2]}")
    flags, at = data[3], 10
    if flags & 4:  # FEXTRA
        if len(data) < at + 2:
            return None
        at += 2 + int.from_bytes(data[at : at + 2], "little")
    for flag in (8, 16):  # FNAME, FCOMMENT: zero-terminated
        if flags & flag:
            end = data.find(b"\0", at)
            if end < 0:
                return None
            at = end + 1
    if flags & 2:  # FHCRC
        at += 2
    return at if len(data) >= at else None


class _Writer:
    """Creates members under ``dest``; small files through a pool of threads."""

    def __init__(self, dest: str) -> None:
        self.dest = dest
        self.total = 0
        self._pool = ThreadPoolExecutor(WRITERS, thread_name_prefix="env-extract")
        self._pending: list[Future[None]] = []
        self._budget = threading.BoundedSemaphore(IN_FLIGHT // INLINE)
        self._dirs: dict[str, int] = {}  # made here -> mode to set at the end
        self._files: set[str] = set()
        self._known: set[str] = {dest}  # directories that exist

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.drain()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if exc[0] is None:
            for path, mode in self._dirs.items():  # last: a read-only directory stays writable
                os.chmod(path, mode)

    def drain(self) -> None:
        """Wait for every file handed to the pool; raise the first error."""
        pending, self._pending = self._pending, []
        for fut in pending:
            fut.result()

    def _path(self, name: str) -> str:
        return os.path.join(self.dest, posixpath.normpath(name))

    def _parent(self, path: str) -> None:
        parent = os.path.dirname(path)
        if parent not in self._known:
            os.makedirs(parent, 0o700, exist_ok=True)
            self._known.add(parent)

    def member(self, tar: tarfile.TarFile, ti: tarfile.TarInfo) -> None:
        path = self._path(ti.name)
        if ti.isdir():
            if path not in self._known:
                self._parent(path)
                os.makedirs(path, 0o700, exist_ok=True)
                self._known.add(path)
            self._dirs[path] = (ti.mode & 0o755) | 0o700
            return
        self._parent(path)
        if path in self._files or path in self._dirs:
            self.drain()  # a later member of the same name wins, as with tar
        if ti.issym():
            if os.path.lexists(path):
                os.unlink(path)
            os.symlink(ti.linkname, path)
            return
        if ti.islnk():
            self.drain()  # its target must be written first
            target = self._path(ti.linkname)
            if os.path.lexists(path):
                os.unlink(path)
            os.link(target, path, follow_symlinks=False)
            self._files.add(path)
            return
        mode = ti.mode & 0o755
        if not mode & 0o100:
            mode &= ~0o111
        mode |= 0o600
        self._files.add(path)
        self.total += ti.size
        f = tar.extractfile(ti)
        assert f is not None  # a regular file: checked
        if ti.size > INLINE:
            _write(path, mode, ti.mtime, f.read, ti.size)
            return
        data = f.read()
        if len(data) != ti.size:
            raise tarfile.ReadError(f"{ti.name}: unexpected end of data")
        self._budget.acquire()
        fut = self._pool.submit(self._write_small, path, mode, ti.mtime, data)
        self._pending.append(fut)
        if len(self._pending) > 256:  # keep the list short; errors surface early
            done = [p for p in self._pending if p.done()]
            for p in done:
                p.result()
            self._pending = [p for p in self._pending if not p.done()]

    def _write_small(self, path: str, mode: int, mtime: float, data: bytes) -> None:
        try:
            _write(path, mode, mtime, None, len(data), data)
        finally:
            self._budget.release()


def _write(
    path: str,
    mode: int,
    mtime: float,
    read: Callable[[int], bytes] | None,
    size: int,
    data: bytes = b"",
) -> None:
    fd = os.open(path, _OPEN, mode)
    try:
        if read is None:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        else:
            left = size
            while left:
                block = read(min(left, INLINE))
                if not block:
                    raise tarfile.ReadError(f"{path}: unexpected end of data")
                left -= len(block)
                view = memoryview(block)
                while view:
                    view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)  # the umask applied at open; the archive's bits count
        # The archive's mtimes keep the shipped .pyc files valid (they record their
        # source's mtime); "now" would make every one of them stale.
        os.utime(fd, (mtime, mtime))
    finally:
        os.close(fd)


def _check_root(ti: tarfile.TarInfo) -> None:
    name = posixpath.normpath(ti.name)
    if name != ROOT and not name.startswith(ROOT + "/"):
        raise UnsafeArchiveError(f"archive member {ti.name!r} lies outside {ROOT}/")


def _inside(path: str) -> bool:
    norm = posixpath.normpath(path)
    return not (posixpath.isabs(path) or norm == ".." or norm.startswith("../"))


def _check_member(ti: tarfile.TarInfo, seen: set[str], links: set[str]) -> None:
    """``seen``: earlier members, ``links``: earlier symbolic links."""
    name = ti.name
    if not _inside(name):
        raise UnsafeArchiveError(f"archive member {name!r} points outside the destination")
    # Writing beneath a link of the archive's own would resolve paths through it, where
    # the string checks below no longer say where things land.
    parts = posixpath.normpath(name).split("/")
    for i in range(1, len(parts)):
        if "/".join(parts[:i]) in links:
            raise UnsafeArchiveError(
                f"archive member {name!r} lies beneath the link {'/'.join(parts[:i])!r}"
            )
    if not (ti.isfile() or ti.isdir() or ti.issym() or ti.islnk()) or ti.issparse():
        raise UnsafeArchiveError(
            f"archive member {name!r} is a special file (device, FIFO, sparse file)"
        )
    if ti.issym():
        if posixpath.isabs(ti.linkname):
            raise UnsafeArchiveError(
                f"archive member {name!r} is a link to the absolute path {ti.linkname!r}"
            )
        target = posixpath.join(posixpath.dirname(name), ti.linkname)
        norm = posixpath.normpath(target)
        if not (norm == ROOT or norm.startswith(ROOT + "/")):
            raise UnsafeArchiveError(
                f"archive member {name!r} links to {ti.linkname!r}, outside the environment"
            )
    if ti.islnk():
        target = posixpath.normpath(ti.linkname)
        if target not in seen or target in links:
            raise UnsafeArchiveError(
                f"archive member {name!r} is a hard link to {ti.linkname!r}, "
                "which is not an earlier file of the archive"
            )
    seen.add(posixpath.normpath(name))
    if ti.issym():
        links.add(posixpath.normpath(name))
