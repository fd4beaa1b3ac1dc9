"""``open_batched(..., direct=True)``: in-process streams get each message at once."""

from __future__ import annotations

import pytest
import trio

from trioscheduler.wire import (
    BatchedSend,
    DirectSend,
    Stream,
    connect,
    inproc,
    listen,
    open_batched,
)


async def test_a_message_reaches_the_peer_without_waiting() -> None:
    mine, theirs = inproc.stream_pair("inproc://a", "inproc://b")
    async with open_batched(mine, direct=True) as out:
        assert type(out) is DirectSend
        out.send_nowait({"op": "one"})
        out.send_nowait(("two", 2))
        # no schedule point in between: both are already in the peer's channel
        assert theirs.receive_nowait() == {"op": "one"}
        assert theirs.receive_nowait() == ("two", 2)
        assert (out.messages_sent, out.batches_sent) == (2, 2)


async def test_a_full_channel_queues_messages_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inproc, "BUFFER_MESSAGES", 3)
    mine, theirs = inproc.stream_pair("inproc://a", "inproc://b")
    with trio.fail_after(10):
        async with open_batched(mine, direct=True) as out:
            for i in range(50):
                out.send_nowait(i)
            got = [await theirs.receive() for _ in range(50)]
        assert got == list(range(50))
        assert out.messages_sent == 50


async def test_a_closed_peer_makes_sends_fail() -> None:
    mine, theirs = inproc.stream_pair("inproc://a", "inproc://b")
    with pytest.raises(trio.BrokenResourceError):
        async with open_batched(mine, direct=True) as out:
            await theirs.aclose()
            with pytest.raises(trio.BrokenResourceError):
                out.send_nowait("lost")
            out.send_nowait("also lost")  # stays broken


async def test_over_tcp_it_is_an_ordinary_batched_send() -> None:
    async def ignore(stream: Stream) -> None:
        async for _ in stream:
            pass

    with trio.fail_after(10):
        async with listen("tcp://127.0.0.1:0", ignore) as lst:
            async with await connect(lst.address) as stream:
                async with open_batched(stream, direct=True) as out:
                    assert type(out) is BatchedSend


async def test_a_reader_that_takes_messages_as_sent_gets_them_in_the_senders_step() -> None:
    """``deliver_to``: after what was in the channel, messages reach the handler inside
    the sender's call, in order, by every way of sending; the end still comes through
    the channel; ``deliver_to(None)`` goes back to the channel."""
    mine, theirs = inproc.stream_pair("inproc://a", "inproc://b")
    got: list[object] = []
    with trio.fail_after(10):
        async with open_batched(mine, direct=True) as out:
            out.send_nowait("queued before")
            assert theirs.receive_nowait() == "queued before"
            theirs.deliver_to(lambda msg: got.append(msg) is None)
            out.send_nowait(1)
            assert got == [1]  # no schedule point: handled within send_nowait
            await mine.send(2)
            await out.send(3)
            assert got == [1, 2, 3]
            theirs.deliver_to(None)
            out.send_nowait(4)
            assert theirs.receive_nowait() == 4 and got == [1, 2, 3]
        await mine.aclose()
        with pytest.raises(trio.EndOfChannel):
            await theirs.receive()


async def test_a_reader_that_declines_a_message_gets_it_and_the_rest_through_the_channel() -> None:
    """A handler that returns False leaves that message to the channel; while the channel
    holds it (``backlog``), a handler that keeps order declines the next ones too: the
    reader takes them all from the channel, in the order they were sent."""
    mine, theirs = inproc.stream_pair("inproc://a", "inproc://b")
    got: list[object] = []
    busy = [True]

    def handler(msg: object) -> bool:
        if busy[0] or theirs.backlog():
            return False
        got.append(msg)
        return True

    with trio.fail_after(10):
        async with open_batched(mine, direct=True) as out:
            theirs.deliver_to(handler)
            out.send_nowait(1)
            await mine.send(2)
            busy[0] = False
            out.send_nowait(3)  # behind 1 and 2, still in the channel
            assert got == [] and theirs.backlog()
            assert await theirs.receive_batch() == [1, 2, 3]
            assert not theirs.backlog()
            out.send_nowait(4)
            assert got == [4]
