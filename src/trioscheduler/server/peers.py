"""The scheduler's side of its connections: each peer's batched sender, how far its
stream was handled (so an RPC sent after stream messages waits for them), and RPCs that
give up when the requester hangs up."""

from __future__ import annotations

from typing import Any

import trio

from trioscheduler import wire

__all__ = ["WAITING_OPS", "Peer", "ProtocolViolation", "unless_peer_leaves"]


class ProtocolViolation(Exception):
    """A peer sent something that does not belong on its connection."""


class Peer:
    """A peer's batched sender, and how many of its stream messages were handled.

    When to write is ``BatchedSend``'s rule alone (at once after one schedule point,
    coalescing only bursts); this class used to add its own "write now after a quiet
    interval" task, which that rule made redundant.
    """

    __slots__ = ("batched", "received", "waiters")

    def __init__(self, batched: wire.BatchedSend) -> None:
        self.batched = batched
        self.received = 0  # messages handled from this peer (after its first)
        self.waiters: list[tuple[int, trio.Event]] = []

    def handled_one(self) -> None:
        self.received += 1
        if self.waiters:
            still = []
            for n, event in self.waiters:
                if self.received >= n:
                    event.set()
                else:
                    still.append((n, event))
            self.waiters = still

    async def caught_up(self, n: int) -> None:
        """Until ``n`` messages of this peer's stream were handled (RPC after stream)."""
        if self.received < n:
            event = trio.Event()
            self.waiters.append((n, event))
            await event.wait()

    def send(self, msg: Any) -> None:
        self.batched.send_nowait(msg)


WAITING_OPS = frozenset({"wait_for_workers", "coord_wait"})

"""RPCs that may wait indefinitely: abandoned when the requester hangs up."""


async def unless_peer_leaves(stream: Any, awaitable: Any) -> Any:
    """``await awaitable``, but give up (raise ``EndOfChannel``) if the peer closes first.

    The requester sends nothing while it waits for the reply, so any receive that
    returns means it went away (or broke the protocol).
    """
    result: list[Any] = []
    try:
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                result.append(await awaitable)
                nursery.cancel_scope.cancel()

            async def watch() -> None:
                try:
                    await stream.receive()
                except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
            nursery.start_soon(watch)
    except BaseExceptionGroup as group:  # the handler's own error, unwrapped (bad input)
        raise wire.sole_error(group) from None
    if not result:
        raise trio.EndOfChannel("the requester left before the reply")
    return result[0]
