"""The stream: one connection with the shape of a trio memory channel pair.

Every transport implements the same small surface so that the scheduler, workers and
clients never know which one they hold. The errors are trio's own, with the same
meaning for every transport:

* ``trio.ClosedResourceError``: *we* closed this stream and then used it;
* ``trio.BrokenResourceError`` on ``send``: the peer is gone (``ProtocolError``, a
  subclass, when the peer sent bytes that are not our protocol);
* ``trio.EndOfChannel`` on ``receive``: the peer closed cleanly; ``async for`` ends.

``_send_batch`` writes many messages as one unit (``BatchedSend`` uses it); the
receiving stream hands them out one by one, so batching is invisible to receivers.
Receivers that want to go faster take what has already arrived without a schedule
point per message: ``receive_nowait``, ``receive_batch``, or ``async for`` (which does).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import trio

from trioscheduler.errors import TrioSchedulerError

logger = logging.getLogger("trioscheduler.wire")


class ConnectError(TrioSchedulerError, OSError):
    """Could not connect (refused until the time-out, or the handshake failed)."""


class ProtocolError(TrioSchedulerError, trio.BrokenResourceError):
    """The peer sent something that is not our protocol; the connection is closed."""


class ProtocolVersionError(ConnectError):
    """The peer speaks another version of the wire protocol."""


class Stream(ABC):
    """A bidirectional message stream to one peer (abstract; see ``tcp``/``inproc``).

    ``peer_role`` and ``peer_info`` are what the peer announced in the handshake.
    """

    __slots__ = ("local_address", "peer_address", "peer_role", "peer_info")

    local_address: str
    peer_address: str
    peer_role: str
    peer_info: dict[str, Any]

    def __init__(self, local_address: str, peer_address: str) -> None:
        self.local_address = local_address
        self.peer_address = peer_address
        self.peer_role = ""
        self.peer_info = {}

    async def send(self, msg: Any) -> None:
        """Send one message; waits while the transport applies back-pressure."""
        encoded, _ = self._encode(msg)
        await self._send_encoded([encoded])

    @abstractmethod
    async def receive(self) -> Any:
        """The next message; ``trio.EndOfChannel`` once the peer has closed."""
        ...

    @abstractmethod
    def receive_nowait(self) -> Any:
        """The next message if it is already here, without a schedule point.

        Raises ``trio.WouldBlock`` if getting one would mean waiting (over TCP: if no
        message of an already received batch is left), ``trio.EndOfChannel`` if the
        peer has closed and nothing is left, ``trio.ClosedResourceError`` if we closed.
        """
        ...

    async def receive_batch(self) -> list[Any]:
        """Waits for the next message, then returns it with every one already here.

        At least one message, in order; one schedule point for all of them (like
        ``receive``). ``trio.EndOfChannel`` once the peer has closed.
        """
        msgs = [await self.receive()]
        try:
            while True:
                msgs.append(self.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return msgs

    @abstractmethod
    async def aclose(self) -> None:
        """Close both directions; idempotent. The peer sees ``EndOfChannel``."""
        ...

    @property
    @abstractmethod
    def closed(self) -> bool:
        """True once ``aclose`` was called or the connection broke."""
        ...

    @abstractmethod
    def _encode(self, msg: Any) -> tuple[Any, int]:
        """``(what _send_encoded takes, size in bytes)``; raises on unserializable input."""
        ...

    @abstractmethod
    async def _send_encoded(self, encoded: Sequence[Any]) -> None:
        """Write already encoded messages, in order, as few writes as possible."""
        ...

    @abstractmethod
    async def _send_batch(self, msgs: list[Any], walk: bool = True) -> None:
        """Write ``msgs`` in order as one unit; the receiver still gets them one by one.

        ``walk=False`` promises no large byte strings hide in the messages (fast path).
        """
        ...

    @abstractmethod
    def _is_reusable(self) -> bool:
        """Idle and healthy: not closed, peer still there, nothing unsolicited to read."""
        ...

    def __aiter__(self) -> Stream:
        """``async for msg in stream``: every message until the peer closes.

        Messages already here are handed out without a schedule point each (as by
        ``receive_nowait``); the iteration waits (and is a schedule point) only when it
        must. Nothing is buffered by the iterator: after a ``break``, ``receive`` goes
        on with the next message. (The stream is its own iterator, not an async
        generator: trio warns about generators left unfinished by a ``break``.)
        """
        return self

    async def __anext__(self) -> Any:
        try:
            return self.receive_nowait()
        except trio.WouldBlock:
            pass
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return f"<{type(self).__name__} {self.local_address} -> {self.peer_address}{state}>"
