"""A pool of short-lived connections (worker-to-worker data, client RPC).

``async with pool.connect(address) as stream:`` hands out an idle connection to that
address if one is healthy, else opens one. A stream whose block raised is closed and
never handed out again (it may hold half a reply). At most ``limit`` connections are
open at once: at the limit an idle connection to another address is closed to make
room, and otherwise callers wait for a connection to come back.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from trioscheduler.wire.endpoints import _close_now, connect
from trioscheduler.wire.stream import Stream


class ConnectionPool:
    """Connections per address, reused; ``limit`` bounds how many are open in total."""

    __slots__ = (
        "limit", "timeout", "role", "info", "ssl_context", "require_encryption",
        "_idle", "_in_use", "_open", "_lot", "_closed",
    )  # fmt: skip

    def __init__(
        self,
        limit: int = 512,
        timeout: float = 10.0,
        role: str = "peer",
        info: dict[str, Any] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        require_encryption: bool = False,
    ) -> None:
        if limit < 1:
            raise ValueError(f"a connection pool needs a limit of at least 1, not {limit}")
        self.limit = limit
        self.timeout = timeout
        self.role = role
        self.info = info
        self.ssl_context = ssl_context  # for tls:// addresses (see ``wire.connect``)
        self.require_encryption = require_encryption
        self._idle: dict[str, list[Stream]] = {}
        self._in_use: dict[Stream, str] = {}
        self._open = 0  # idle + in use + being opened
        self._lot = trio.lowlevel.ParkingLot()
        self._closed = False

    @property
    def open(self) -> int:
        """Connections open now (idle, in use, or being opened)."""
        return self._open

    @property
    def idle(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def __repr__(self) -> str:
        return f"<ConnectionPool open={self._open} idle={self.idle} limit={self.limit}>"

    @asynccontextmanager
    async def connect(self, address: str) -> AsyncIterator[Stream]:
        """A connection to ``address`` for the duration of the block."""
        stream = await self._acquire(address)
        healthy = False
        try:
            yield stream
            healthy = True
        finally:
            await self._release(stream, healthy)

    async def _acquire(self, address: str) -> Stream:
        while True:
            if self._closed:
                raise trio.ClosedResourceError("the connection pool is closed")
            idle = self._idle.get(address)
            while idle:
                stream = idle.pop()
                if stream._is_reusable():
                    self._in_use[stream] = address
                    await trio.lowlevel.checkpoint()
                    return stream
                await self._discard(stream)
            if self._open < self.limit:
                self._open += 1
                try:
                    stream = await connect(
                        address,
                        timeout=self.timeout,
                        role=self.role,
                        info=self.info,
                        ssl_context=self.ssl_context,
                        require_encryption=self.require_encryption,
                    )
                except BaseException:
                    self._open -= 1
                    self._lot.unpark()
                    raise
                self._in_use[stream] = address
                return stream
            if not await self._evict_one():
                await self._lot.park()

    async def _evict_one(self) -> bool:
        """Close the oldest idle connection (to any address); False if there is none."""
        for streams in self._idle.values():
            if streams:
                await self._discard(streams.pop(0))
                return True
        return False

    async def _discard(self, stream: Stream) -> None:
        self._open -= 1
        await _close_now(stream)
        self._lot.unpark()

    async def _release(self, stream: Stream, healthy: bool) -> None:
        address = self._in_use.pop(stream)
        if healthy and not self._closed and stream._is_reusable():
            self._idle.setdefault(address, []).append(stream)
            self._lot.unpark()
        else:
            await self._discard(stream)

    async def aclose(self) -> None:
        """Close idle connections now; those in use close when their block ends."""
        await self._close()
        await trio.lowlevel.checkpoint()

    async def _close(self) -> None:
        """``aclose`` without its checkpoint (the closes themselves are shielded)."""
        self._closed = True
        idle = [s for streams in self._idle.values() for s in streams]
        self._idle.clear()
        for stream in idle:
            await self._discard(stream)
        self._lot.unpark_all()

    async def __aenter__(self) -> ConnectionPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        # No checkpoint: under a cancelled scope it would raise Cancelled in place of
        # the block's own error, which the enclosing scope then absorbs (lost).
        await self._close()
