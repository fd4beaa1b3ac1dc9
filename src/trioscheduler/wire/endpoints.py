"""``connect`` and ``listen``: the same two calls for every transport.

A listener owns a nursery; every accepted connection runs its handler there, and the
stream is closed when the handler returns. A failing handler, a peer that speaks
garbage or another protocol version: each closes only its own connection and is
logged (logger ``trioscheduler.wire``) with the peer's address. Leaving the ``listen``
block cancels every handler and closes every connection.

``connect`` retries refused connections with backoff until its time-out, so a client
or worker may start before its scheduler.

``tls://`` addresses need an ``ssl_context`` (from ``Security.get_listen_args`` /
``get_connection_args``); the TLS handshake, then our msgpack-only hello, run within
the handshake time-out. ``require_encryption`` refuses plain ``tcp://`` on both ends.
A TLS failure (no certificate, a wrong one, plain tcp against TLS) is not retried:
it is a ``ConnectError`` on the connecting side and a logged refusal on the other.
"""

from __future__ import annotations

import errno
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import trio

from trioscheduler.wire._nursery import background_nursery
from trioscheduler.wire.address import AddressError, parse_address, tcp_address
from trioscheduler.wire.handshake import check_hello, make_hello, pack_hello, unpack_hello
from trioscheduler.wire.inproc import InprocStream, stream_pair, unique_name
from trioscheduler.wire.security import SecurityError
from trioscheduler.wire.stream import (
    ConnectError,
    ProtocolError,
    ProtocolVersionError,
    Stream,
    logger,
)
from trioscheduler.wire.tcp import MAX_FRAME_BYTES, TCPStream, adopt, frame_prefix, set_nodelay
from trioscheduler.wire.tls import (
    TLS_HANDSHAKE_RECORD,
    TLSStream,
    describe_ssl_error,
    first_byte,
    plain_refusal,
    tls_handshake,
)
from trioscheduler.wire.unix_route import (
    bind_shortcut,
    connect_shortcut,
    enabled,
    local_name,
    names_this_host,
    peer_name,
    widen,
)

Handler = Callable[[Stream], Awaitable[None]]

#: Largest frame accepted before the handshake completed: strangers get little memory.
HELLO_MAX_BYTES: Final = 64 * 1024
#: A TCP connection must be identified within this: TLS handshake, hello, and the first
#: bytes of its first message (every peer of ours sends one at once).
HANDSHAKE_TIMEOUT: Final = 10.0
#: Connections of a listener not yet identified; past it the oldest is closed (so a
#: flood of silent connections costs the attacker its own, never a real peer's, slot).
MAX_UNIDENTIFIED: Final = 256
#: Refusals of strangers are logged as a warning at most once per this many seconds.
QUIET_INTERVAL: Final = 10.0
_ACCEPT_RETRY_ERRNOS: Final = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class _NotListening(OSError):
    pass


class Listener:
    """A bound address that runs ``handler(stream)`` for each accepted connection."""

    __slots__ = (
        "address", "role", "info", "_handler", "_nursery", "_token", "_handshake_timeout",
        "_ssl_context", "_max_frame_bytes", "_unidentified", "_max_unidentified", "_quiet",
        "_peer_speaks_first",
    )  # fmt: skip

    def __init__(
        self,
        handler: Handler,
        role: str,
        info: dict[str, Any] | None,
        nursery: trio.Nursery,
        handshake_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        max_unidentified: int = MAX_UNIDENTIFIED,
        peer_speaks_first: bool = False,
    ) -> None:
        self.address = ""
        self.role = role
        self.info = dict(info or {})
        self._handler = handler
        self._nursery = nursery
        self._token = trio.lowlevel.current_trio_token()
        self._handshake_timeout = handshake_timeout
        self._ssl_context = ssl_context
        self._max_frame_bytes = max_frame_bytes
        self._unidentified: dict[trio.CancelScope, None] = {}  # oldest first
        self._max_unidentified = max_unidentified
        self._quiet = _QuietLog()
        self._peer_speaks_first = peer_speaks_first

    def __repr__(self) -> str:
        return f"<Listener {self.address} role={self.role}>"

    @property
    def unidentified(self) -> int:
        """TCP connections accepted and not yet identified (handshake, first message)."""
        return len(self._unidentified)

    async def _serve_socket(self, conn: socket.socket, peer: str) -> None:
        """A freshly accepted TCP connection: identify it (TLS if ours, the hello, the
        first message's first bytes) within the handshake time-out, then ``_serve``."""
        stream: TCPStream | None = None
        identified = False
        try:
            with trio.CancelScope() as scope:
                self._admit(scope)
                try:
                    with trio.fail_after(self._handshake_timeout):
                        stream = await self._wrap(conn, peer)
                        if stream is None:
                            return
                        await _tcp_handshake(stream, self.role, self.info)
                        if self._peer_speaks_first:
                            await stream._wait_message()
                        identified = True
                except trio.TooSlowError:
                    self._quiet.warn(
                        "closed connection from %s to %s: not identified within %s s "
                        "(TLS handshake, hello and a first message)",
                        peer, self.address, self._handshake_timeout,
                    )  # fmt: skip
                except (ProtocolError, ProtocolVersionError, OSError) as e:
                    self._quiet.warn(
                        "refused connection from %s to %s: %s", peer, self.address, e
                    )
                except (trio.BrokenResourceError, trio.EndOfChannel) as e:
                    logger.debug("connection from %s to %s ended: %r", peer, self.address, e)
                finally:
                    self._unidentified.pop(scope, None)
            if scope.cancelled_caught:
                self._quiet.warn(
                    "closed connection from %s to %s: more than %d connections not yet "
                    "identified, this one the oldest",
                    peer, self.address, self._max_unidentified,
                )  # fmt: skip
        finally:
            if not identified:
                if stream is not None:
                    stream._close_socket()
                conn.close()
        if identified:
            assert stream is not None
            await self._serve(stream, handshaken=True)

    def _admit(self, scope: trio.CancelScope) -> None:
        pending = self._unidentified
        while len(pending) >= self._max_unidentified:
            oldest = next(iter(pending))
            del pending[oldest]
            oldest.cancel()
        pending[scope] = None

    async def _wrap(self, conn: socket.socket, peer: str) -> TCPStream | None:
        ctx = self._ssl_context
        if ctx is None:
            return TCPStream(conn, self.address, peer, self._max_frame_bytes)
        first = await first_byte(conn)
        if first is None:
            conn.close()
            return None
        if first != TLS_HANDSHAKE_RECORD:
            # Plain bytes on a TLS port: say so in our framing (msgpack), then close.
            message = f"{self.address} accepts TLS only; connect with security= to tls://"
            try:
                conn.send(plain_refusal(message))
            except OSError:
                pass
            raise ProtocolError(f"{peer} spoke plain tcp to a TLS listener; refused")
        tls = ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        try:
            await tls_handshake(tls)
        except ssl.SSLError as e:
            tls.close()
            raise ProtocolError(f"TLS handshake failed: {describe_ssl_error(e)}") from None
        except BaseException:
            tls.close()
            raise
        return TLSStream(tls, self.address, peer, self._max_frame_bytes)

    async def _serve(self, stream: Stream, handshaken: bool = False) -> None:
        """Handshake (TCP only, unless done), then the handler; the stream is closed either way."""
        peer = stream.peer_address
        try:
            if isinstance(stream, TCPStream) and not handshaken:
                with trio.fail_after(self._handshake_timeout):
                    await _tcp_handshake(stream, self.role, self.info)
            await self._handler(stream)
        except (ProtocolError, ProtocolVersionError) as e:
            logger.warning("closed connection from %s to %s: %s", peer, self.address, e)
        except trio.TooSlowError:
            logger.warning(
                "closed connection from %s to %s: no handshake within %s s",
                peer, self.address, self._handshake_timeout,
            )  # fmt: skip
        except (trio.BrokenResourceError, trio.EndOfChannel, trio.ClosedResourceError) as e:
            logger.debug("connection from %s to %s ended: %r", peer, self.address, e)
        except Exception:
            logger.exception("handler for connection from %s to %s failed", peer, self.address)
        finally:
            await _close_now(stream)

    def _accept_inproc(self, server: InprocStream, hello: dict[str, Any]) -> dict[str, Any]:
        """Take an in-process connection; returns our hello for the connecting side."""
        try:
            server.peer_role, server.peer_info = check_hello(hello, server.peer_address)
        except (ProtocolError, ProtocolVersionError) as e:
            logger.warning("refused connection from %s to %s: %s", server.peer_address, self.address, e)
            raise
        try:
            self._nursery.start_soon(self._serve, server)
        except RuntimeError:  # the listener is shutting down
            raise _NotListening(f"{self.address} is closing") from None
        return make_hello(self.role, self.info)


class _QuietLog:
    """Warnings about strangers, at most one per ``QUIET_INTERVAL``: a flood of bad
    connections must not become a flood of log lines (the rest go to debug, counted)."""

    __slots__ = ("_last", "_suppressed")

    def __init__(self) -> None:
        self._last = -QUIET_INTERVAL
        self._suppressed = 0

    def warn(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last < QUIET_INTERVAL:
            self._suppressed += 1
            logger.debug(msg, *args)
            return
        if self._suppressed:
            msg += f" ({self._suppressed} similar in the last {now - self._last:.0f} s)"
        self._last, self._suppressed = now, 0
        logger.warning(msg, *args)


async def _close_now(stream: Stream) -> None:
    """Close even when cancelled (the close itself never blocks)."""
    with trio.CancelScope(shield=True):
        await stream.aclose()


_INPROC: dict[str, Listener] = {}


async def _tcp_handshake(stream: TCPStream, role: str, info: dict[str, Any] | None) -> None:
    """Exchange hellos: plain msgpack both ways, never ``serialize.loads`` (no pickle)."""
    limit = stream.max_frame_bytes
    stream.max_frame_bytes = min(limit, HELLO_MAX_BYTES)
    try:
        header = pack_hello(make_hello(role, info))
        await stream._send_encoded([(frame_prefix([header]), header)])
        if not isinstance(stream, TLSStream) and stream._end == stream._start:
            await _refuse_tls_client(stream)
        hello = unpack_hello(await stream._read_message(), stream.peer_address)
    finally:
        stream.max_frame_bytes = limit
    stream.peer_role, stream.peer_info = check_hello(hello, stream.peer_address)


async def _refuse_tls_client(stream: TCPStream) -> None:
    """A TLS ClientHello on a plain port gets a clear refusal, not 'bad frame count'."""
    first = await first_byte(stream._sock)
    if first == TLS_HANDSHAKE_RECORD:
        stream._close_socket()
        raise ProtocolError(
            f"{stream.peer_address} started a TLS handshake on a plain tcp:// listener "
            "(connect with tcp://, or start this process with security=)"
        )


@asynccontextmanager
async def listen(
    address: str,
    handler: Handler,
    *,
    role: str = "scheduler",
    info: dict[str, Any] | None = None,
    max_frame_bytes: int = MAX_FRAME_BYTES,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    backlog: int = 1024,
    ssl_context: ssl.SSLContext | None = None,
    require_encryption: bool = False,
    max_unidentified: int = MAX_UNIDENTIFIED,
    peer_speaks_first: bool = False,
) -> AsyncIterator[Listener]:
    """Listen on ``address`` (``tcp://``/``tls://host:port``, port 0 for any; ``inproc://name``).

    Yields a ``Listener`` whose ``.address`` is the real bound address. A TCP
    connection is identified by its hello within ``handshake_timeout``; with
    ``peer_speaks_first`` (the scheduler, workers and nannies: every peer of theirs
    sends a request at once) also the first bytes of its first message must arrive in
    that time, before the handler starts. At most ``max_unidentified`` connections wait
    to be identified; past that the oldest is closed.
    """
    scheme, host, port = parse_address(address)
    if "://" not in address and require_encryption:
        scheme = "tls"
    _check_scheme(scheme, address, ssl_context, require_encryption, "listen on")
    async with background_nursery() as nursery:
        listener = Listener(
            handler, role, info, nursery, handshake_timeout,
            ssl_context if scheme == "tls" else None, max_frame_bytes, max_unidentified,
            peer_speaks_first,
        )  # fmt: skip
        shortcut = None
        if scheme in ("tcp", "tls"):
            assert port is not None
            sock = await _bind(host, port, backlog)
            bound = sock.getsockname()
            listener.address = tcp_address(bound[0], bound[1], scheme)
            nursery.start_soon(_accept_loop, listener, sock)
            if scheme == "tcp" and (unix := bind_shortcut(bound[0], bound[1], backlog)):
                shortcut = trio.socket.from_stdlib_socket(unix)
                nursery.start_soon(_accept_loop, listener, shortcut)
        else:
            name = host or unique_name("listener-")
            if name in _INPROC:
                raise OSError(errno.EADDRINUSE, f"inproc://{name} is already listening")
            listener.address = f"inproc://{name}"
            _INPROC[name] = listener
        try:
            yield listener
        finally:
            nursery.cancel_scope.cancel()  # before the socket closes: no accept on a closed fd
            if scheme != "inproc":
                for s in (sock, shortcut):
                    if s is not None:
                        trio.lowlevel.notify_closing(s)
                        s.close()
            else:
                del _INPROC[name]


async def _bind(host: str, port: int, backlog: int) -> trio.socket.SocketType:
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    family, type_, proto, _, sockaddr = infos[0]
    sock = trio.socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind(sockaddr)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _check_scheme(
    scheme: str,
    address: str,
    ssl_context: ssl.SSLContext | None,
    require_encryption: bool,
    verb: str,
) -> None:
    if scheme == "tls" and ssl_context is None:
        raise SecurityError(
            f"cannot {verb} {address}: tls:// needs certificates; pass security= "
            "(a trioscheduler.Security with tls_ca_file and the role's cert/key, or "
            "Security.temporary())"
        )
    if scheme == "tcp" and require_encryption:
        raise SecurityError(
            f"refusing to {verb} {address}: require_encryption is set, so plain tcp:// "
            "is not allowed; use a tls:// address"
        )


async def _accept_loop(listener: Listener, sock: trio.socket.SocketType) -> None:
    nursery = listener._nursery
    while True:
        try:
            conn, addr = await sock.accept()
        except OSError as e:
            if e.errno in _ACCEPT_RETRY_ERRNOS:
                logger.error("%s cannot accept connections for now: %s", listener.address, e)
                await trio.sleep(0.1)
                continue
            if e.errno == errno.ECONNABORTED:
                continue
            raise
        if conn.family == socket.AF_UNIX:
            widen(conn)
            peer = peer_name(conn)
        else:
            set_nodelay(conn)
            scheme = "tls" if listener._ssl_context is not None else "tcp"
            peer = tcp_address(addr[0], addr[1], scheme)
        nursery.start_soon(listener._serve_socket, adopt(conn), peer)


async def connect(
    address: str,
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 (the API of dask.distributed.comm.connect)
    role: str = "client",
    info: dict[str, Any] | None = None,
    max_frame_bytes: int = MAX_FRAME_BYTES,
    ssl_context: ssl.SSLContext | None = None,
    require_encryption: bool = False,
) -> Stream:
    """A handshaken ``Stream`` to ``address``; ``ConnectError`` after ``timeout`` seconds.

    Refused connections (nothing listening yet) are retried with backoff until then; a
    protocol version mismatch, a refusal or a failed TLS handshake raise at once.
    """
    scheme, host, port = parse_address(address)
    if "://" not in address and scheme == "tcp":
        scheme = "tls" if require_encryption else "tcp"
        address = f"{scheme}://{address}"
    _check_scheme(scheme, address, ssl_context, require_encryption, "connect to")
    deadline = trio.current_time() + timeout
    delay = 0.005
    last: BaseException | None = None
    with trio.move_on_at(deadline):
        while True:
            try:
                if scheme != "inproc":
                    assert port is not None
                    ctx = ssl_context if scheme == "tls" else None
                    return await _connect_tcp(address, host, port, role, info, max_frame_bytes, ctx)
                stream = _connect_inproc(address, host, role, info)
                await trio.lowlevel.checkpoint()
                return stream
            except (ConnectError, AddressError):
                raise
            except ssl.SSLError as e:
                raise ConnectError(
                    f"could not connect to {address}: TLS handshake failed: {describe_ssl_error(e)}"
                ) from None
            except ProtocolError as e:
                raise ConnectError(f"could not connect to {address}: {e}") from e
            except (OSError, trio.BrokenResourceError, trio.EndOfChannel) as e:
                last = e
            await trio.sleep(max(0.0, min(delay, deadline - trio.current_time())))
            delay = min(delay * 1.5, 1.0)
    reason = f": {last}" if last is not None else " (no answer to the handshake)"
    raise ConnectError(f"could not connect to {address} within {timeout} s{reason}")


async def _shortcut(host: str, port: int) -> socket.socket | None:
    """``connect_shortcut``, this host's own name included: resolved first
    (``tcp://myhost:8786`` takes the shortcut as ``tcp://127.0.0.1:8786`` does). If it
    does not resolve, TCP's own resolution reports it."""
    if not names_this_host(host):
        return connect_shortcut(host, port)
    if not enabled():
        return None
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    for *_, sockaddr in infos:
        sock = connect_shortcut(str(sockaddr[0]), port)
        if sock is not None:
            return sock
    return None


async def _connect_tcp(
    address: str,
    host: str,
    port: int,
    role: str,
    info: dict[str, Any] | None,
    max_frame_bytes: int,
    ssl_context: ssl.SSLContext | None,
) -> TCPStream:
    unix = None if ssl_context is not None else await _shortcut(host, port)
    if unix is not None:
        sock = unix
        local_address = local_name()
    else:
        socket_stream = await trio.open_tcp_stream(host, port)  # sets TCP_NODELAY
        sock = adopt(socket_stream.socket)
        local = sock.getsockname()
        local_address = tcp_address(local[0], local[1], "tls" if ssl_context else "tcp")
    stream: TCPStream
    if ssl_context is None:
        stream = TCPStream(sock, local_address, address, max_frame_bytes)
    else:
        tls = ssl_context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
        try:
            await tls_handshake(tls)
        except BaseException:
            tls.close()
            raise
        stream = TLSStream(tls, local_address, address, max_frame_bytes)
    try:
        await _tcp_handshake(stream, role, info)
    except trio.BrokenResourceError as e:
        stream._close_socket()
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ssl.SSLError):  # TLS 1.3: the server checks our certificate late
            raise cause from None
        raise
    except BaseException:
        stream._close_socket()
        raise
    return stream


def _connect_inproc(address: str, name: str, role: str, info: dict[str, Any] | None) -> InprocStream:
    listener = _INPROC.get(name)
    if listener is None:
        raise _NotListening(errno.ECONNREFUSED, f"nothing listens on {address}")
    if listener._token is not trio.lowlevel.current_trio_token():
        raise ConnectError(
            f"{address} belongs to another trio run; inproc:// works only inside one trio.run"
        )
    client, server = stream_pair(f"inproc://{unique_name('client-')}", listener.address)
    theirs = listener._accept_inproc(server, make_hello(role, info))
    client.peer_role, client.peer_info = check_hello(theirs, address)
    return client
