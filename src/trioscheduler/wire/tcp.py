"""TCP transport: length-prefixed frames on a raw trio socket.

One message on the wire is::

    u32 n_frames | n_frames x u64 frame length | frame bytes ...

(little-endian). Messages are simply concatenated, so a batch of messages is one
``sendmsg`` and the receiver needs no notion of batches. We use the trio socket itself
rather than ``trio.SocketStream`` for two system calls it does not expose: ``sendmsg``
(frames go out as one scatter/gather write, never joined when large) and
``recv_into`` (a large frame is received straight into the ``bytearray`` that becomes
the user's numpy array: no copy after the kernel's).

Small frames are read through a 64 KiB buffer so that many small messages cost one
``recv``. Every length is checked against ``max_frame_bytes`` before anything is
allocated for it.
"""

from __future__ import annotations

import select
import socket
import struct
from collections.abc import Sequence
from typing import Any, Final

import trio

from trioscheduler.wire.serialize import DeserializationError, Frame, dumps, loads
from trioscheduler.wire.stream import ProtocolError, Stream

_U32: Final = struct.Struct("<I")
_BUFFER: Final = 64 * 1024  # read-ahead buffer, and the threshold of a "large" frame
_MAX_FRAMES: Final = 1 << 16  # frames per message
_IOV_MAX: Final = 512  # buffers per sendmsg call (the OS limit is 1024)
#: Default largest frame accepted (a 4 GiB numpy array is fine; more: raise the limit).
MAX_FRAME_BYTES: Final = 1 << 32


def frame_prefix(frames: Sequence[Frame]) -> bytes:
    """The length prefix of a message of ``frames``."""
    n = len(frames)
    return struct.pack(f"<I{n}Q", n, *[len(f) for f in frames])


class TCPStream(Stream):
    """A ``Stream`` over one connected TCP socket (see the module doc for the format)."""

    __slots__ = (
        "_sock", "_buf", "_view", "_start", "_end", "_send_lock", "_recv_lock",
        "_closed", "_eof", "max_frame_bytes",
    )  # fmt: skip

    def __init__(
        self,
        sock: trio.socket.SocketType,
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
        self._send_lock = trio.StrictFIFOLock()
        self._recv_lock = trio.StrictFIFOLock()
        self._closed = False
        self._eof = False  # the peer closed (or reset) the connection
        self.max_frame_bytes = max_frame_bytes

    @property
    def closed(self) -> bool:
        return self._closed

    # ---------------------------------------------------------------------- sending

    def _encode(self, msg: Any) -> tuple[Any, int]:
        frames = dumps(msg)
        prefix = frame_prefix(frames)
        return (prefix, *frames), len(prefix) + sum([len(f) for f in frames])

    async def _send_encoded(self, encoded: Sequence[Any]) -> None:
        # Join small buffers (one memcpy beats an iovec entry); pass large ones as they are.
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
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        if self._eof:
            raise trio.BrokenResourceError(f"{self.peer_address} closed the connection")
        async with self._send_lock:
            try:
                await self._sendall(out)
            except OSError as e:
                self._eof = True
                raise trio.BrokenResourceError(
                    f"connection to {self.peer_address} broke: {e}"
                ) from e

    async def _sendall(self, bufs: list[Frame]) -> None:
        i = 0
        while i < len(bufs):
            sent = await self._sock.sendmsg(bufs[i : i + _IOV_MAX])
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
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        async with self._recv_lock:
            frames = await self._read_message()
        try:
            return loads(frames)
        except DeserializationError as e:
            await self._abort()
            raise ProtocolError(f"bad message from {self.peer_address}: {e}") from e

    async def _fill(self, n: int, boundary: bool) -> None:
        """Make ``n`` unread bytes available in the buffer."""
        if len(self._buf) - self._start < n:  # no room: move the unread bytes to a new buffer
            buf = bytearray(max(_BUFFER, n))
            have = self._end - self._start
            buf[:have] = self._view[self._start : self._end]
            self._buf, self._view, self._start, self._end = buf, memoryview(buf), 0, have
        while self._end - self._start < n:
            got = await self._recv_into(self._view[self._end :], boundary and self._end == self._start)
            self._end += got

    async def _recv_into(self, view: memoryview, boundary: bool) -> int:
        """One ``recv_into``; EOF is ``EndOfChannel`` at a message boundary, else an error."""
        if self._eof:
            if boundary:
                raise trio.EndOfChannel
            raise trio.BrokenResourceError(f"connection to {self.peer_address} is broken")
        try:
            got = await self._sock.recv_into(view)
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError) as e:
            self._eof = True
            if boundary:
                raise trio.EndOfChannel from e
            raise trio.BrokenResourceError(f"connection to {self.peer_address} broke: {e}") from e
        except OSError as e:
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed") from e
            raise trio.BrokenResourceError(f"connection to {self.peer_address} broke: {e}") from e
        if got == 0:
            self._eof = True
            if boundary:
                raise trio.EndOfChannel
            await self._abort()
            raise ProtocolError(f"{self.peer_address} closed the connection in the middle of a message")
        return got

    async def _read_message(self) -> list[Frame]:
        if self._start == self._end:
            self._start = self._end = 0
        await self._fill(4, boundary=True)
        (n,) = _U32.unpack_from(self._buf, self._start)
        if not 0 < n <= _MAX_FRAMES:
            await self._abort()
            raise ProtocolError(
                f"bad message from {self.peer_address}: {n} frames (1 to {_MAX_FRAMES} allowed)"
            )
        await self._fill(4 + 8 * n, boundary=False)
        lengths = struct.unpack_from(f"<{n}Q", self._buf, self._start + 4)
        limit = self.max_frame_bytes
        for length in lengths:
            if length > limit:
                await self._abort()
                raise ProtocolError(
                    f"bad message from {self.peer_address}: a frame of {length} bytes exceeds "
                    f"the limit of {limit} bytes"
                )
        self._start += 4 + 8 * n
        frames: list[Frame] = []
        for i, length in enumerate(lengths):
            if length < _BUFFER:
                await self._fill(length, boundary=False)
                s = self._start
                # The header is decoded before the buffer is reused: a view is enough.
                # Other small frames may end up inside user objects: copy them out.
                frames.append(self._view[s : s + length] if i == 0 else bytearray(self._view[s : s + length]))
                self._start = s + length
            else:
                frames.append(await self._read_large(length))
        return frames

    async def _read_large(self, length: int) -> bytearray:
        out = bytearray(length)
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

    async def _abort(self) -> None:
        self._close_socket()

    def _close_socket(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()

    def _is_reusable(self) -> bool:
        if self._closed or self._eof or self._end != self._start:
            return False
        try:  # readable while idle means EOF or unsolicited bytes: either way, not reusable
            readable, _, _ = select.select([self._sock.fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable


def set_nodelay(sock: trio.socket.SocketType) -> None:
    """Small messages must not wait for Nagle's algorithm."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
