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
