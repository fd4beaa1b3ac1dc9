"""The scheduler's side of a client's stream: the client's messages fed to the core, and
what they queue for workers written at once.

A client in the scheduler's own trio run (``LocalCluster``'s, ``Client(scheduler)``) talks
to it over an ``inproc`` stream. Taking each message off that stream's channel costs the
serving task a wake-up and a task switch, and its flush a lock and a schedule point: ~40 us
of a ~500 us ``submit(...).result()`` round trip. So such a client's messages are fed inside
its own send (``InprocStream.deliver_to``, ``ClientDelivery``), and what they queue for
workers is written before that send returns (``BatchedSend.flush_nowait``).

Never re-entered, never out of order: a message sent while the scheduler is feeding (a
plugin's hook, a client reacting to a result inside the scheduler's delivery to it), or
behind one still in the channel, is left to the channel and the serving task, which takes
it in order. So is ``RemoveClient``: the serving task, waiting on the channel, ends the
connection.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import trio

from trioscheduler import wire
from trioscheduler.core import messages as m
from trioscheduler.server.peers import Peer, ProtocolViolation
from trioscheduler.wire.inproc import InprocStream

if TYPE_CHECKING:
    from trioscheduler.server.scheduler import Scheduler

__all__ = ["ClientDelivery", "serve_client"]

CLIENT_EVENTS = frozenset(
    {
        m.UpdateGraph,
        m.UpdateData,
        m.ClientDesiresKeys,
        m.ClientReleasesKeys,
        m.CancelKeys,
        m.RetryKeys,
        m.RemoveClient,
    }
)


async def serve_client(s: Scheduler, stream: Any, add: m.AddClient) -> None:
    cid = add.client
    if cid in s._clients or cid == m.FIRE_AND_FORGET:
        raise ProtocolViolation(f"client id {cid!r} is already connected")
    # A client in this trio run (inproc) gets each message at once: no batching delay.
    async with wire.open_batched(stream, s.batch_interval, direct=True) as batched:
        peer = s._clients[cid] = Peer(batched)
        feed = functools.partial(feed_client_batch, s, cid, peer)
        inproc = stream if isinstance(stream, InprocStream) else None
        delivery = None
        removed = False
        try:
            add.now = trio.current_time()
            s._feed(add)
            # The client waits for this before using RPCs that name it.
            peer.send({"op": "stream-start", "client": cid, "services": s.services()})
            if inproc is not None:  # fed inside its sends; the channel gets what they leave
                delivery = ClientDelivery(feed, s, inproc)
                inproc.deliver_to(delivery)
            while not removed:
                try:
                    batch = await stream.receive_batch()
                except trio.EndOfChannel:
                    break
                if delivery is not None and delivery.failed is not None:
                    raise delivery.failed
                removed, held = feed(batch)
                # not kept while flushing or waiting: a graph's TaskSpecs would outlive its
                # handling (the tree's peak came while _flush_workers still held them)
                batch = []
                # what the batch queued for workers (ComputeTask...) is written now: a
                # graph starts work without waiting for the senders' wake-ups
                await s._flush_client_work(held)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if inproc is not None:
                inproc.deliver_to(None)
            del s._clients[cid]
            s.coordination.client_gone(cid)
            if not removed:
                s._feed(
                    m.RemoveClient(s._stimulus("client-stream-closed"), trio.current_time(), cid)
                )


def feed_client_batch(
    s: Scheduler, cid: str, peer: Peer, batch: Iterable[Any]
) -> tuple[bool, list[Peer]]:
    """Feed a client's messages: (did it say ``RemoveClient``, the workers' senders they
    queued on, held for the caller to write and release)."""
    held: list[Peer] = []
    s._held = held
    try:
        for msg in batch:
            t = type(msg)
            if t not in CLIENT_EVENTS or (
                msg.client != cid
                and not (t is m.ClientDesiresKeys and msg.client == m.FIRE_AND_FORGET)
            ):
                raise ProtocolViolation(f"client {cid} sent {msg!r:.200}")
            msg.now = trio.current_time()
            s._feed(msg)
            peer.handled_one()
            if t is m.RemoveClient:
                return True, held
        return False, held
    except BaseException:
        for p in held:
            p.batched.unhold()
        raise
    finally:
        s._held = None


class ClientDelivery:
    """What an in-process client's sends are fed through (``InprocStream.deliver_to``).

    An error of a feed is kept in ``failed`` and its message left to the channel: the
    serving task raises it there, as it would have feeding that message itself.
    """

    __slots__ = ("_feed", "_scheduler", "_stream", "failed")

    def __init__(
        self,
        feed: Callable[[Iterable[Any]], tuple[bool, list[Peer]]],
        scheduler: Scheduler,
        stream: InprocStream,
    ) -> None:
        self._feed = feed
        self._scheduler = scheduler
        self._stream = stream
        self.failed: BaseException | None = None

    def __call__(self, msg: Any) -> bool:
        if (
            self.failed is not None
            or type(msg) is m.RemoveClient
            or self._scheduler._feeding
            or self._stream.backlog()
        ):
            return False
        try:
            _, held = self._feed((msg,))
        except BaseException as exc:  # the serving task raises it (it gets the message)
            self.failed = exc
            return False
        if type(msg) is m.ClientReleasesKeys:
            # What it frees on workers goes with what comes next (the client sends its
            # releases just before its next graph), as a batch over a socket would.
            for peer in held:
                peer.batched.unhold_later()
            return True
        for peer in held:  # written now (what a socket does not take, its writer finishes)
            try:
                peer.batched.flush_nowait()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the worker's stream is going: its serving task handles that
            finally:
                peer.batched.unhold()
        return True
