"""In-process transport: a pair of trio memory channels per connection.

Objects pass by reference, nothing is serialized, so a message received is the very
object that was sent (mutating it afterwards is visible to the receiver, as in dask's
inproc comm). Listeners live in a per-process table, tagged with the trio run that
opened them: an ``inproc://`` address only means something inside that one run.

A reader whose handling of a message is synchronous may take messages as they are
sent (``deliver_to``): the sender's task calls it, no channel and no task switch in
between; the end of the stream still comes through the channel.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from typing import Any, Final

import trio

from trioscheduler.wire.stream import Stream

#: Messages in flight per direction before ``send`` waits (the "kernel buffer").
BUFFER_MESSAGES: Final = 1024

_counter = itertools.count(1)


def unique_name(prefix: str = "") -> str:
    return f"{prefix}{os.getpid()}-{next(_counter)}"


class InprocStream(Stream):
    """A ``Stream`` over two memory channels; errors are the channels' own."""

    __slots__ = ("_send", "_recv", "_closed", "_peer", "_deliver")

    def __init__(
        self,
        send: trio.MemorySendChannel[Any],
        recv: trio.MemoryReceiveChannel[Any],
        local_address: str,
        peer_address: str,
    ) -> None:
        super().__init__(local_address, peer_address)
        self._send = send
        self._recv = recv
        self._closed = False
        self._peer: InprocStream | None = None  # the other end (``stream_pair``)
        self._deliver: Callable[[Any], bool] | None = None  # see ``deliver_to``

    def deliver_to(self, handler: Callable[[Any], bool] | None) -> None:
        """From now on, hand each message sent to this end to ``handler`` at once, in
        the sender's task (``None``: through the channel again). Take what is in the
        channel first (``receive_nowait``): those were sent before. ``handler`` must
        not raise, and must not wait for its peer (it runs inside the peer's send); it
        returns False to leave a message to the channel (and so each later one, until
        the channel is empty again: ``backlog``)."""
        self._deliver = handler

    def backlog(self) -> bool:
        """Are messages waiting in this end's channel?"""
        return self._recv.statistics().current_buffer_used > 0

    def peer_delivery(self) -> Callable[[Any], bool] | None:
        """The handler the other end takes messages with (``deliver_to``), if any."""
        peer = self._peer
        return None if peer is None else peer._deliver

    @property
    def closed(self) -> bool:
        return self._closed

    async def send(self, msg: Any) -> None:
        deliver = self.peer_delivery()
        if deliver is not None and not self._closed and deliver(msg):
            await trio.lowlevel.checkpoint()
            return
        await self._send.send(msg)

    def _encode(self, msg: Any) -> tuple[Any, int]:
        return msg, 0

    async def _send_batch(self, msgs: list[Any], walk: bool = True) -> None:
        await self._send_encoded(msgs)

    async def _send_encoded(self, encoded: Sequence[Any]) -> None:
        deliver = self.peer_delivery()
        send = self._send
        if deliver is not None and not self._closed:
            for i, msg in enumerate(encoded):
                if not deliver(msg):
                    encoded = encoded[i:]  # this one and the rest through the channel
                    break
            else:
                await trio.lowlevel.checkpoint()
                return
        for msg in encoded:
            try:
                send.send_nowait(msg)
            except trio.WouldBlock:
                await send.send(msg)
        await trio.lowlevel.checkpoint()

    async def receive(self) -> Any:
        return await self._recv.receive()

    def receive_nowait(self) -> Any:
        return self._recv.receive_nowait()

    async def aclose(self) -> None:
        self._closed = True
        self._send.close()
        self._recv.close()
        await trio.lowlevel.checkpoint()

    def _is_reusable(self) -> bool:
        if self._closed:
            return False
        stats = self._recv.statistics()
        return stats.open_send_channels > 0 and stats.current_buffer_used == 0


def stream_pair(client_address: str, server_address: str) -> tuple[InprocStream, InprocStream]:
    """``(client side, server side)`` of a new in-process connection."""
    c2s_send, c2s_recv = trio.open_memory_channel[Any](BUFFER_MESSAGES)
    s2c_send, s2c_recv = trio.open_memory_channel[Any](BUFFER_MESSAGES)
    client = InprocStream(c2s_send, s2c_recv, client_address, server_address)
    server = InprocStream(s2c_send, c2s_recv, server_address, client_address)
    client._peer, server._peer = server, client
    return client, server

