"""``connect`` and ``listen``: the same two calls for every transport.

A listener owns a nursery; every accepted connection runs its handler there, and the
stream is closed when the handler returns. A failing handler, a peer that speaks
garbage or another protocol version: each closes only its own connection and is
logged (logger ``trioscheduler.wire``) with the peer's address. Leaving the ``listen``
block cancels every handler and closes every connection.

``connect`` retries refused connections with backoff until its time-out, so a client
or worker may start before its scheduler.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import trio

from trioscheduler.wire._nursery import background_nursery
from trioscheduler.wire.address import AddressError, parse_address, tcp_address
from trioscheduler.wire.handshake import check_hello, make_hello
from trioscheduler.wire.inproc import InprocStream, stream_pair, unique_name
from trioscheduler.wire.stream import (
    ConnectError,
    ProtocolError,
    ProtocolVersionError,
    Stream,
    logger,
)
from trioscheduler.wire.tcp import MAX_FRAME_BYTES, TCPStream, adopt, set_nodelay

Handler = Callable[[Stream], Awaitable[None]]

#: Largest frame accepted before the handshake completed: strangers get little memory.
HELLO_MAX_BYTES: Final = 64 * 1024
HANDSHAKE_TIMEOUT: Final = 10.0
_ACCEPT_RETRY_ERRNOS: Final = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class _NotListening(OSError):
    pass


class Listener:
    """A bound address that runs ``handler(stream)`` for each accepted connection."""

    __slots__ = ("address", "role", "info", "_handler", "_nursery", "_token", "_handshake_timeout")

    def __init__(
        self,
        handler: Handler,
        role: str,
        info: dict[str, Any] | None,
        nursery: trio.Nursery,
        handshake_timeout: float,
    ) -> None:
        self.address = ""
        self.role = role
        self.info = dict(info or {})
        self._handler = handler
        self._nursery = nursery
        self._token = trio.lowlevel.current_trio_token()
        self._handshake_timeout = handshake_timeout

    def __repr__(self) -> str:
        return f"<Listener {self.address} role={self.role}>"

    async def _serve(self, stream: Stream) -> None:
        """Handshake (TCP only), then the handler; the stream is closed either way."""
        peer = stream.peer_address
        try:
            if isinstance(stream, TCPStream):
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


async def _close_now(stream: Stream) -> None:
    """Close even when cancelled (the close itself never blocks)."""
    with trio.CancelScope(shield=True):
        await stream.aclose()


_INPROC: dict[str, Listener] = {}


async def _tcp_handshake(stream: TCPStream, role: str, info: dict[str, Any] | None) -> None:
    limit = stream.max_frame_bytes
    stream.max_frame_bytes = min(limit, HELLO_MAX_BYTES)
    try:
        await stream.send(make_hello(role, info))
        hello = await stream.receive()
    finally:
        stream.max_frame_bytes = limit
    stream.peer_role, stream.peer_info = check_hello(hello, stream.peer_address)


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
) -> AsyncIterator[Listener]:
    """Listen on ``address`` (``tcp://host:port``, port 0 for any; ``inproc://name``).

    Yields a ``Listener`` whose ``.address`` is the real bound address.
    """
    scheme, host, port = parse_address(address)
    async with background_nursery() as nursery:
        listener = Listener(handler, role, info, nursery, handshake_timeout)
        if scheme == "tcp":
            assert port is not None
            sock = await _bind(host, port, backlog)
            bound = sock.getsockname()
            listener.address = tcp_address(bound[0], bound[1])
            nursery.start_soon(_accept_loop, listener, sock, max_frame_bytes)
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
            if scheme == "tcp":
                trio.lowlevel.notify_closing(sock)
                sock.close()
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


async def _accept_loop(listener: Listener, sock: trio.socket.SocketType, max_frame_bytes: int) -> None:
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
        set_nodelay(conn)
        stream = TCPStream(adopt(conn), listener.address, tcp_address(addr[0], addr[1]), max_frame_bytes)
        nursery.start_soon(listener._serve, stream)


async def connect(
    address: str,
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 (the API of dask.distributed.comm.connect)
    role: str = "client",
    info: dict[str, Any] | None = None,
    max_frame_bytes: int = MAX_FRAME_BYTES,
) -> Stream:
    """A handshaken ``Stream`` to ``address``; ``ConnectError`` after ``timeout`` seconds.

    Refused connections (nothing listening yet) are retried with backoff until then; a
    protocol version mismatch raises ``ProtocolVersionError`` at once.
    """
    scheme, host, port = parse_address(address)
    if scheme == "tcp" and "://" not in address:
        address = "tcp://" + address
    deadline = trio.current_time() + timeout
    delay = 0.005
    last: BaseException | None = None
    with trio.move_on_at(deadline):
        while True:
            try:
                if scheme == "tcp":
                    assert port is not None
                    return await _connect_tcp(address, host, port, role, info, max_frame_bytes)
                stream = _connect_inproc(address, host, role, info)
                await trio.lowlevel.checkpoint()
                return stream
            except (ProtocolVersionError, AddressError):
                raise
            except ProtocolError as e:
                raise ConnectError(f"could not connect to {address}: {e}") from e
            except (OSError, trio.BrokenResourceError, trio.EndOfChannel) as e:
                last = e
            await trio.sleep(max(0.0, min(delay, deadline - trio.current_time())))
            delay = min(delay * 1.5, 1.0)
    reason = f": {last}" if last is not None else " (no answer to the handshake)"
    raise ConnectError(f"could not connect to {address} within {timeout} s{reason}")


async def _connect_tcp(
    address: str,
    host: str,
    port: int,
    role: str,
    info: dict[str, Any] | None,
    max_frame_bytes: int,
) -> TCPStream:
    socket_stream = await trio.open_tcp_stream(host, port)  # sets TCP_NODELAY
    sock = adopt(socket_stream.socket)
    local = sock.getsockname()
    stream = TCPStream(sock, tcp_address(local[0], local[1]), address, max_frame_bytes)
    try:
        await _tcp_handshake(stream, role, info)
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
