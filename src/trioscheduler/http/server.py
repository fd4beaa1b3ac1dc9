"""A small HTTP/1.1 server on trio and h11, with limits, for the dashboard.

Why our own and not hypercorn: the dashboard answers a handful of GET routes from one
trio task tree, and h11 (the only dependency) gives us the protocol without a framework.
Measured for this project (shared/research/dashboard): ~160 us per keep-alive request
against ~330 us for hypercorn's trio worker, and every limit (header size, body size,
idle time, connections) is ours to set and test. There are no streaming responses (the
pages poll), so a client that goes away can never leave a stream running.

A handler is ``async (Request) -> Response``. Protocol errors close only their own
connection, after a 4xx reply when one can still be sent; a handler that raises gives a
500 and one log line.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import h11
import trio

__all__ = ["HttpLimits", "HttpServer", "Request", "Response"]

logger = logging.getLogger("trioscheduler.http")

_REASONS = {
    200: b"OK", 301: b"Moved Permanently", 302: b"Found", 304: b"Not Modified",
    400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
    408: b"Request Timeout", 413: b"Content Too Large", 414: b"URI Too Long",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    503: b"Service Unavailable",
}  # fmt: skip


@dataclass(slots=True)
class Request:
    method: str
    target: str  # as sent: path and query, percent-encoded
    path: str  # decoded path, no query
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names

    def accepts_gzip(self) -> bool:
        return "gzip" in self.headers.get("accept-encoding", "")


@dataclass(slots=True)
class Response:
    """``gzipped``: the same body compressed, sent instead when the client accepts it.
    ``etag``: a ``If-None-Match`` naming it gets an empty 304."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)
    gzipped: bytes | None = None
    etag: str | None = None


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(slots=True)
class HttpLimits:
    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 64 * 1024  # GET and HEAD only: a body is not expected at all
    max_connections: int = 256
    idle_timeout: float = 30.0  # to receive the next complete request on a connection
    send_timeout: float = 30.0


class _Close(Exception):
    """End this connection (after the reply, if any, was sent)."""


class HttpServer:
    """Serve ``handler`` on TCP listeners: ``await nursery.start(server.serve, host, port)``
    returns the bound ``(host, port)``; an address in use raises ``OSError`` there."""

    def __init__(self, handler: Handler, limits: HttpLimits | None = None) -> None:
        self.handler = handler
        self.limits = limits or HttpLimits()
        self.open_connections = 0
        self.requests = 0  # answered, for tests and the dashboard's own figures

    async def serve(
        self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host or None)
        try:
            bound = listeners[0].socket.getsockname()
            task_status.started((str(bound[0]), int(bound[1])))
            await trio.serve_listeners(self._on_stream, listeners)
        finally:
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await listener.aclose()

    async def _on_stream(self, stream: trio.SocketStream) -> None:
        if self.open_connections >= self.limits.max_connections:
            await stream.aclose()  # over the limit: refuse at once, no reply owed
            return
        self.open_connections += 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        try:
            while True:
                with trio.move_on_after(self.limits.idle_timeout):
                    request = await self._read_request(stream, conn)
                    if request is None:
                        return
                    response = await self._answer(request)
                    await self._send(stream, conn, request, response)
                    self.requests += 1
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        return
                    conn.start_next_cycle()
                    continue
                return  # idle too long
        except _Close:
            pass
        except h11.RemoteProtocolError as exc:
            await self._refuse(stream, conn, exc.error_status_hint, str(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            pass
        finally:
            self.open_connections -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _read_request(
        self, stream: trio.SocketStream, conn: h11.Connection
    ) -> Request | None:
        head: h11.Request | None = None
        body = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)  # b"" means EOF: h11 turns it into ConnectionClosed
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None
            if isinstance(event, h11.Request):
                # h11 bounds a head that arrives in pieces; one that came whole is checked here
                size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
                if size > self.limits.max_header_bytes:
                    await self._refuse(stream, conn, 431, "request head too large")
                    raise _Close
                head = event
            elif isinstance(event, h11.Data):
                body += len(event.data)
                if body > self.limits.max_body_bytes:
                    await self._refuse(stream, conn, 413, "request body too large")
                    raise _Close
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return _request(head)

    async def _answer(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return Response(405, b"only GET and HEAD\n", headers=[("Allow", "GET, HEAD")])
        try:
            return await self.handler(request)
        except Exception:
            logger.exception("dashboard: %s %s failed", request.method, request.target[:200])
            return Response(500, b"internal error: see the scheduler's log\n")

    async def _send(
        self, stream: trio.SocketStream, conn: h11.Connection, request: Request, response: Response
    ) -> None:
        status, body = response.status, response.body
        headers = [("Content-Type", response.content_type), *response.headers]
        if response.etag is not None:
            headers.append(("ETag", response.etag))
            if request.headers.get("if-none-match") == response.etag:
                status, body = 304, b""
        if response.gzipped is not None and status == 200:
            headers.append(("Vary", "Accept-Encoding"))
            if request.accepts_gzip():
                body = response.gzipped
                headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(len(body))))
        out = conn.send(
            h11.Response(status_code=status, headers=headers, reason=_REASONS.get(status, b""))
        )
        if request.method != "HEAD" and body:
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        with trio.fail_after(self.limits.send_timeout):
            await stream.send_all(out)

    async def _refuse(
        self, stream: trio.SocketStream, conn: h11.Connection, status: int, text: str
    ) -> None:
        """A 4xx for a request we will not serve, if a reply can still be sent; then close."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f"{status} {_REASONS.get(status, b'').decode()}: {text[:200]}\n".encode()
        try:
            out = conn.send(
                h11.Response(
                    status_code=status,
                    headers=[
                        ("Content-Type", "text/plain; charset=utf-8"),
                        ("Content-Length", str(len(body))),
                        ("Connection", "close"),
                    ],
                    reason=_REASONS.get(status, b""),
                )
            )
            out += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
            with trio.move_on_after(5):
                await stream.send_all(out)
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _request(head: h11.Request) -> Request:
    target = head.target.decode("ascii", errors="replace")
    parts = urlsplit(target)
    headers: dict[str, str] = {}
    for name, value in head.headers:
        headers[name.decode("latin-1").lower()] = value.decode("latin-1")
    return Request(
        method=head.method.decode("ascii", errors="replace"),
        target=target,
        path=unquote(parts.path, errors="replace"),
        query=dict(parse_qsl(parts.query)),
        headers=headers,
    )
