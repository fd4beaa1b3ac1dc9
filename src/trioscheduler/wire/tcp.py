"""TCP transport: length-prefixed frames on a non-blocking socket driven by trio.

One message on the wire is::

    u32 n_frames | n_frames x u64 frame length | frame bytes ...

(little-endian). Messages are simply concatenated, and a batch from ``open_batched``
is one message whose header holds many (``serialize.dumps_batch``); ``receive``
hands them out one by one.

We drive a plain non-blocking ``socket.socket`` with ``trio.lowlevel.wait_readable``
/ ``wait_writable`` instead of ``trio.SocketStream`` for three reasons: ``sendmsg``
(frames go out as one scatter/gather write, large ones never joined), ``recv_into``
(a large frame lands straight in the buffer that becomes the user's numpy array: no
copy after the kernel's), and cost: a full trio schedule point is ~10 us on a busy
machine, more than a small message's whole budget. So ``send``/``receive`` only
reach a schedule point when they must wait, and otherwise once every
``CHECKPOINT_EVERY`` calls: a cancelled task notices within that many messages.

Small frames are read through a 64 KiB buffer so that many small messages cost one
``recv``. Every length is checked against ``max_frame_bytes`` before anything is
allocated for it.
"""

from __future__ import annotations

import socket
import struct
import sys
from collections import deque
from collections.abc import Sequence
from typing import Any, Final, NoReturn

import trio

from trioscheduler.wire.serialize import (
    Batch,
    DeserializationError,
    Frame,
    dumps,
    dumps_batch,
    loads,
)
from trioscheduler.wire.stream import ProtocolError, Stream

_U32: Final = struct.Struct("<I")
_BUFFER: Final = 64 * 1024  # read-ahead buffer, and the threshold of a "large" frame
_MAX_FRAMES: Final = 1 << 16  # frames per message
_IOV_MAX: Final = 512  # buffers per sendmsg call (the OS limit is 1024)
#: A send or receive that did not have to wait is a schedule point once per this many.
CHECKPOINT_EVERY: Final = 64
#: Default largest frame accepted (a 4 GiB numpy array is fine; more: raise the limit).
MAX_FRAME_BYTES: Final = 1 << 32
_GONE: Final = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError)


def frame_prefix(frames: Sequence[Frame]) -> bytes:
    """The length prefix of a message of ``frames``."""
    n = len(frames)
    prefix = _PREFIXES.get(n)
    if prefix is None:
        prefix = struct.Struct(f"<I{n}Q")
        if n <= 16:
            _PREFIXES[n] = prefix
    return prefix.pack(n, *[len(f) for f in frames])


_PREFIXES: dict[int, struct.Struct] = {}


def _lengths(n: int) -> struct.Struct:
    """The frame lengths of a message of ``n`` frames (after the u32 ``n``)."""
    lengths = _LENGTHS.get(n)
    if lengths is None:
        lengths = struct.Struct(f"<{n}Q")
        if n <= 16:
            _LENGTHS[n] = lengths
    return lengths


_LENGTHS: dict[int, struct.Struct] = {}


def adopt(sock: trio.socket.SocketType) -> socket.socket:
    """A plain non-blocking socket owning the file descriptor of trio's ``sock``."""
    raw = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    raw.setblocking(False)
    return raw


def _join(encoded: Sequence[Any]) -> list[Frame]:
    """The buffers of ``encoded`` messages to write: small ones joined (one memcpy beats
    an iovec entry), large ones as they are."""
    out: list[Frame] = []
    small: list[Frame] = []
    for message in encoded:
        for buf in message:
            if len(buf) < _BUFFER:
                small.append(buf)
            else:
                if small:
                    out.append(b"".join(small))
                    small = []
                out.append(buf)
    if small:
        out.append(b"".join(small) if len(small) > 1 else small[0])
    return out


class TCPStream(Stream):
    """A ``Stream`` over one connected TCP socket (see the module doc for the format)."""

    __slots__ = (
        "_sock", "_buf", "_view", "_start", "_end", "_ready", "_ops", "_sending",
        "_receiving", "_closed", "_eof", "max_frame_bytes", "unsent",
    )  # fmt: skip

    def __init__(
        self,
        sock: socket.socket,
        local_address: str,
        peer_address: str,
        max_frame_bytes: int = MAX_FRAME_BYTES,
    ) -> None:
        super().__init__(local_address, peer_address)
        self._sock = sock
        self._buf = bytearray(_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0  # unread bytes are self._buf[_start:_end]
        self._end = 0
        self._ready: deque[Any] = deque()  # received messages of a batch, not yet handed out
        self._ops = 0
        self._sending = trio.StrictFIFOLock()
        self._receiving = trio.StrictFIFOLock()
        self._closed = False
        self._eof = False  # the peer closed (or reset) the connection
        self.max_frame_bytes = max_frame_bytes
        # What ``send_batch_nowait`` wrote only in part: the rest goes before anything
        # else (``_send_encoded``, ``send_unsent``).
        self.unsent: list[Frame] = []

    @property
    def closed(self) -> bool:
        return self._closed

    async def _maybe_checkpoint(self) -> None:
        self._ops += 1
        if self._ops >= CHECKPOINT_EVERY:
            self._ops = 0
            await trio.lowlevel.checkpoint()

    # ---------------------------------------------------------------------- sending

    def _encode(self, msg: Any) -> tuple[Any, int]:
        frames = dumps(msg)
        prefix = frame_prefix(frames)
        return (prefix, *frames), len(prefix) + sum([len(f) for f in frames])

    async def _send_batch(self, msgs: list[Any], walk: bool = True) -> None:
        frames = dumps_batch(msgs, walk)
        await self._send_encoded([(frame_prefix(frames), *frames)])

    def send_batch_nowait(self, msgs: list[Any]) -> bool:
        """Write a batch at once, without a schedule point: False (nothing done) if a
        write is under way. What the socket does not take now stays in ``unsent``, which
        goes before anything else; whoever sees it set awaits ``send_unsent``.
        Raises as ``_send_batch`` does (``SerializationError`` before anything is sent)."""
        if self._sending.locked() or self.unsent:
            return False
        frames = dumps_batch(msgs, True)
        if len(frames) == 2 and len(frames[1]) < _BUFFER:  # a small pickled batch
            out: list[Frame] = [b"".join([frame_prefix(frames), *frames])]
        else:
            out = _join([(frame_prefix(frames), *frames)])
        self._check_open()
        try:
            sent = self._send_now(out)
        except OSError as e:
            self._broke(e)
        i = 0
        while sent:
            n = len(out[i])
            if sent >= n:
                sent -= n
                i += 1
            else:
                out[i] = memoryview(out[i])[sent:]
                sent = 0
        if i < len(out):
            self.unsent = out[i:]
        return True

    def _send_now(self, bufs: list[Frame]) -> int:
        """Bytes of ``bufs`` the socket takes now (0 if none)."""
        try:
            return self._sock.sendmsg(bufs[:_IOV_MAX])
        except BlockingIOError:
            return 0

    async def send_unsent(self) -> None:
        """Write what ``send_batch_nowait`` left (a no-op if nothing)."""
        await self._send_encoded(())

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        if self._eof:
            raise trio.BrokenResourceError(f"{self.peer_address} closed the connection")

    def _broke(self, e: OSError) -> NoReturn:
        self._eof = True
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed") from e
        raise trio.BrokenResourceError(f"connection to {self.peer_address} broke: {e}") from e

    async def _send_encoded(self, encoded: Sequence[Any]) -> None:
        out = _join(encoded)
        self._check_open()
        lock = self._sending
        if lock.locked():
            await lock.acquire()
        else:
            lock.acquire_nowait()
        try:
            if self.unsent:  # the rest of a write begun by send_batch_nowait goes first
                out[:0] = self.unsent
                self.unsent = []
            await self._sendall(out)
        except OSError as e:
            self._broke(e)
        finally:
            lock.release()
        await self._maybe_checkpoint()

    async def _sendall(self, bufs: list[Frame]) -> None:
        sock = self._sock
        i = 0
        while i < len(bufs):
            try:
                sent = sock.sendmsg(bufs[i : i + _IOV_MAX])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            while sent:
                n = len(bufs[i])
                if sent >= n:
                    sent -= n
                    i += 1
                else:
                    bufs[i] = memoryview(bufs[i])[sent:]
                    sent = 0

    # -------------------------------------------------------------------- receiving

    async def receive(self) -> Any:
        if self._ready and not self._closed:  # a batch's hot path: inlined, no nested coroutine
            self._ops += 1
            if self._ops >= CHECKPOINT_EVERY:
                self._ops = 0
                await trio.lowlevel.checkpoint()
            return self._ready.popleft()
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        lock = self._receiving
        if lock.locked():
            await lock.acquire()
        else:
            lock.acquire_nowait()
        try:
            ready = self._ready  # (another receiver may have filled it while we waited)
            while not ready:
                msg = await self._receive_one()
                if type(msg) is Batch:
                    ready.extend(msg)
                else:
                    ready.append(msg)
            msg = ready.popleft()
        finally:
            lock.release()
        await self._maybe_checkpoint()
        return msg

    def receive_nowait(self) -> Any:
        if self._ready and not self._closed:
            return self._ready.popleft()
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        if self._eof and self._start == self._end:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    async def receive_batch(self) -> list[Any]:
        if not self._ready and not self._closed and not self._receiving.locked():
            # the common case, a reader waiting for the next message: a batch that
            # arrives is handed out as it is, not through ``_ready`` message by message
            lock = self._receiving
            lock.acquire_nowait()
            try:
                msg = await self._receive_one()
            finally:
                lock.release()
            await self._maybe_checkpoint()
            if type(msg) is not Batch:
                return [msg]
            if msg:
                return msg
        first = await self.receive()
        ready = self._ready
        if not ready:
            return [first]
        msgs = [first, *ready]
        ready.clear()
        return msgs

    async def _receive_one(self) -> Any:
        """The next message (or batch) off the socket; the caller holds ``_receiving``."""
        frames = await self._read_message()
        try:
            return loads(frames)
        except DeserializationError as e:
            self._close_socket()
            raise ProtocolError(f"bad message from {self.peer_address}: {e}") from e

    async def __anext__(self) -> Any:
        ready = self._ready
        if ready and not self._closed:  # the rest of a batch: no schedule point each
            return ready.popleft()
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def _fill(self, n: int, boundary: bool) -> None:
        """Make ``n`` unread bytes available in the buffer."""
        if len(self._buf) - self._start < n:  # no room: move the unread bytes to a new buffer
            buf = bytearray(max(_BUFFER, n))
            have = self._end - self._start
            buf[:have] = self._view[self._start : self._end]
            self._buf, self._view, self._start, self._end = buf, memoryview(buf), 0, have
        while self._end - self._start < n:
            at_boundary = boundary and self._end == self._start
            self._end += await self._recv_into(self._view[self._end :], at_boundary)

    async def _wait_message(self) -> None:
        """Until the first bytes of the next message are here (``EndOfChannel`` on EOF)."""
        if self._ready or self._end > self._start:
            return
        self._start = self._end = 0
        await self._fill(1, boundary=True)

    # What a transport's recv_into raises besides BlockingIOError (TLS: OpenSSL's own)
    # for "wait until readable", "wait until writable", "the peer went away". Read only
    # when one is raised; a plain socket's wait stays the literal clause (no lookup).
    _wait_readable: tuple[type[OSError], ...] = ()
    _wait_writable: tuple[type[OSError], ...] = ()
    _gone: tuple[type[OSError], ...] = _GONE

    async def _recv_into(self, view: memoryview, boundary: bool) -> int:
        """One ``recv_into``; EOF is ``EndOfChannel`` at a message boundary, else an error."""
        while True:
            if self._eof:
                if boundary:
                    raise trio.EndOfChannel
                raise trio.BrokenResourceError(f"connection to {self.peer_address} is broken")
            try:
                got = self._sock.recv_into(view)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._sock)
                continue
            except self._wait_readable:
                await trio.lowlevel.wait_readable(self._sock)
                continue
            except self._wait_writable:
                await trio.lowlevel.wait_writable(self._sock)
                continue
            except self._gone as e:
                self._eof = True
                if boundary:
                    raise trio.EndOfChannel from e
                raise trio.BrokenResourceError(
                    f"connection to {self.peer_address} broke: {e}"
                ) from e
            except OSError as e:
                self._eof = True
                if self._closed:
                    raise trio.ClosedResourceError("this stream was closed") from e
                raise trio.BrokenResourceError(
                    f"connection to {self.peer_address} broke: {e}"
                ) from e
            if got:
                return got
            self._eof = True
            if boundary:
                raise trio.EndOfChannel
            self._close_socket()
            raise ProtocolError(
                f"{self.peer_address} closed the connection in the middle of a message"
            )

    async def _read_message(self) -> list[Frame]:
        # (``_fill`` is awaited only when bytes are missing: most small messages arrive
        # whole in one ``recv``, and an await that does not wait still costs a coroutine)
        if self._start == self._end:
            self._start = self._end = 0
        if self._end - self._start < 4:
            await self._fill(4, boundary=True)
        (n,) = _U32.unpack_from(self._buf, self._start)
        if not 0 < n <= _MAX_FRAMES:
            self._close_socket()
            raise ProtocolError(
                f"bad message from {self.peer_address}: {n} frames (1 to {_MAX_FRAMES} allowed)"
            )
        if self._end - self._start < 4 + 8 * n:
            await self._fill(4 + 8 * n, boundary=False)
        lengths = _lengths(n).unpack_from(self._buf, self._start + 4)
        limit = self.max_frame_bytes
        for length in lengths:
            if length > limit:
                self._close_socket()
                raise ProtocolError(
                    f"bad message from {self.peer_address}: a frame of {length} bytes exceeds "
                    f"the limit of {limit} bytes"
                )
        self._start += 4 + 8 * n
        frames: list[Frame] = []
        for i, length in enumerate(lengths):
            if length < _BUFFER:
                if self._end - self._start < length:
                    await self._fill(length, boundary=False)
                s = self._start
                # The header is decoded before the buffer is reused: a view is enough.
                # Other small frames may end up inside user objects: copy them out.
                view = self._view[s : s + length]
                frames.append(view if i == 0 else bytearray(view))
                self._start = s + length
            else:
                frames.append(await self._read_large(length))
        return frames

    async def _read_large(self, length: int) -> Any:
        out = _buffers.allocate(length)
        have = min(self._end - self._start, length)
        out[:have] = self._view[self._start : self._start + have]
        self._start += have
        view = memoryview(out)
        while have < length:
            have += await self._recv_into(view[have:], boundary=False)
        return out

    # --------------------------------------------------------------------- closing

    async def aclose(self) -> None:
        self._close_socket()
        await trio.lowlevel.checkpoint()

    def _close_socket(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()

    def _is_reusable(self) -> bool:
        if self._closed or self._eof or self._ready or self._end != self._start:
            return False
        try:  # readable while idle means EOF or unsolicited bytes: either way, not reusable
            self._sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False  # b"" is EOF; anything else was never asked for


class _BufferCache:
    """Large receive buffers, handed out again once nothing references them.

    A fresh 200 MB buffer costs page faults (and, for ``bytearray``, a zero fill) that
    take longer than receiving the data; dask arrays have equal-sized chunks, so the
    next large frame is often the size of one the user has already dropped. A buffer
    is reused only when its reference count shows that nothing (no array, no view)
    points at it any more. Free buffers kept for reuse are bounded by ``retain_bytes``;
    ``release()`` drops them at once (e.g. under memory pressure).
    """

    __slots__ = ("entries", "max_entries", "retain_bytes", "min_bytes", "_empty")

    def __init__(self, max_entries: int = 4, retain_bytes: int = 256 << 20) -> None:
        self.entries: list[Any] = []
        self.max_entries = max_entries
        self.retain_bytes = retain_bytes
        self.min_bytes = 1 << 20
        self._empty: Any = None

    def _free_at(self, k: int) -> bool:
        # Nobody else holds it: the only references are self.entries and the argument.
        return sys.getrefcount(self.entries[k]) <= 2

    def allocate(self, n: int) -> Any:
        if n < self.min_bytes:
            return self._new(n)
        entries = self.entries
        for k in range(len(entries)):  # indices: a loop variable would be a reference
            if len(entries[k]) == n and self._free_at(k):
                buf = entries.pop(k)
                entries.append(buf)
                return buf
        buf = self._new(n)
        entries.append(buf)
        self._trim()
        return buf

    def _trim(self) -> None:
        entries = self.entries
        free = [k for k in range(len(entries) - 1) if self._free_at(k)]  # oldest first
        retained = sum(len(entries[k]) for k in free)
        drop: set[int] = set()
        for k in free:
            if len(entries) - len(drop) <= self.max_entries and retained <= self.retain_bytes:
                break
            drop.add(k)
            retained -= len(entries[k])
        if drop:
            entries[:] = [b for k, b in enumerate(entries) if k not in drop]
        while len(entries) > self.max_entries:  # the rest are in use: just forget them
            del entries[0]

    def release(self) -> None:
        """Forget every cached buffer (those still in use live on with their users)."""
        self.entries.clear()

    def _new(self, n: int) -> Any:
        """``numpy.empty`` when numpy is there: ``bytearray(n)`` would zero-fill first."""
        if self._empty is None:
            try:
                import numpy
            except ImportError:
                self._empty = bytearray
            else:
                self._empty = lambda size: numpy.empty(size, dtype=numpy.uint8)
        return self._empty(n)


_buffers = _BufferCache()


def release_buffers() -> None:
    """Drop large receive buffers kept for reuse (see ``_BufferCache``)."""
    _buffers.release()


def set_nodelay(sock: trio.socket.SocketType | socket.socket) -> None:
    """Small messages must not wait for Nagle's algorithm."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
