"""TLS transport: the TCP stream's framing over an ``ssl.SSLSocket``.

``TLSStream`` is a ``TCPStream`` whose bytes go through OpenSSL: the same message
format, the same read-ahead buffer, receive loop and large-frame path, only the two
calls that touch the socket differ (``send`` instead of ``sendmsg``: a TLS record cannot
be scattered; ``recv_into`` of the SSL socket, whose "wait" and end-of-stream errors
are OpenSSL's own: ``_wait_readable``, ``_wait_writable``, ``_gone``). The TLS handshake runs before our own
hello, so with mutual TLS a peer is authenticated before it can send a single byte
of ours, let alone a pickle.

A plain-tcp peer knocking on a TLS listener is told so in our own framing (the
refusal is msgpack, never pickle), so its ``connect`` fails with a clear message
instead of a time-out.
"""

from __future__ import annotations

import _socket
import socket
import ssl
from typing import Any, Final

import msgpack
import trio

from trioscheduler.wire.handshake import refusal
from trioscheduler.wire.tcp import MAX_FRAME_BYTES, TCPStream, frame_prefix

#: The first byte of a TLS record carrying a handshake (a ClientHello starts with it).
TLS_HANDSHAKE_RECORD: Final = 0x16
#: One ``send`` of the SSL socket takes at most this much (OpenSSL counts in ``int``).
_SEND_CHUNK: Final = 16 << 20


class TLSStream(TCPStream):
    """A ``Stream`` over one TLS connection (handshake already done)."""

    __slots__ = ()

    _sock: ssl.SSLSocket

    def __init__(
        self,
        sock: ssl.SSLSocket,
        local_address: str,
        peer_address: str,
        max_frame_bytes: int = MAX_FRAME_BYTES,
    ) -> None:
        super().__init__(sock, local_address, peer_address, max_frame_bytes)

    def send_batch_nowait(self, msgs: list[Any]) -> bool:
        return False  # an SSL socket is written by ``_sendall`` only

    async def _sendall(self, bufs: list[bytes | bytearray | memoryview]) -> None:
        sock = self._sock
        for buf in bufs:
            view = memoryview(buf).cast("B") if not isinstance(buf, bytes) else memoryview(buf)
            while view:
                try:
                    sent = sock.send(view[:_SEND_CHUNK])
                except (ssl.SSLWantWriteError, BlockingIOError):
                    await trio.lowlevel.wait_writable(sock)
                    continue
                except ssl.SSLWantReadError:  # a renegotiation/key update wants input
                    await trio.lowlevel.wait_readable(sock)
                    continue
                except ssl.SSLError as e:
                    raise OSError(f"TLS error: {e}") from e
                view = view[sent:]

    _wait_readable = (ssl.SSLWantReadError,)
    _wait_writable = (ssl.SSLWantWriteError,)  # a renegotiation/key update sends first
    _gone = (ssl.SSLZeroReturnError, ssl.SSLEOFError, ConnectionError)

    def _is_reusable(self) -> bool:
        if self._closed or self._eof or self._ready or self._end != self._start:
            return False
        if self._sock.pending():
            return False
        try:  # the raw socket: any TLS record arriving while idle (an alert, EOF) disqualifies
            _socket.socket.recv(self._sock, 1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False


async def tls_handshake(sock: ssl.SSLSocket) -> None:
    """Drive ``do_handshake`` on a non-blocking SSL socket (the caller bounds the time)."""
    while True:
        try:
            sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            await trio.lowlevel.wait_readable(sock)
        except ssl.SSLWantWriteError:
            await trio.lowlevel.wait_writable(sock)


async def first_byte(sock: socket.socket) -> int | None:
    """The first byte the peer sent, left in the socket (``None``: it closed)."""
    while True:
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        return data[0] if data else None


def plain_refusal(message: str) -> bytes:
    """A one-frame msgpack message a plain-tcp trioscheduler peer reads as its hello."""
    header: bytes = msgpack.packb(refusal(message))
    return frame_prefix([header]) + header


def describe_ssl_error(e: BaseException) -> str:
    """An ``ssl`` error as a sentence a user can act on."""
    reason = getattr(e, "reason", None) or str(e)
    hints = {
        "CERTIFICATE_VERIFY_FAILED": "the peer's certificate is not signed by our tls_ca_file",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a client certificate and we "
        "presented none it accepts",
        "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer presented no certificate",
        "WRONG_VERSION_NUMBER": "the peer does not speak TLS (a plain tcp:// listener?)",
        "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust our certificate (signed by "
        "another CA)",
        "SSLV3_ALERT_BAD_CERTIFICATE": "the peer rejected our certificate",
    }
    hint = hints.get(str(reason).upper())
    if hint is None and isinstance(e, ssl.SSLEOFError | ConnectionError):
        hint = "the peer closed the connection during the TLS handshake"
    return f"{reason} ({hint})" if hint else str(reason)
