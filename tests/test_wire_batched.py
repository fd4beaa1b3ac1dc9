"""Batched sending: transparent to the receiver, ordered, coalesced, flushed on exit."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator

import numpy as np
import pytest
import trio
import trio.testing
from trio.testing import MockClock

from trioscheduler.wire import SerializationError, Stream, connect, listen, open_batched

pytestmark = pytest.mark.parametrize("transport", ["tcp", "inproc"])


@pytest.fixture
async def inbox(transport: str) -> AsyncIterator[tuple[str, trio.MemoryReceiveChannel[object]]]:
    """A listener that forwards every message it receives into a channel."""
    send, recv = trio.open_memory_channel[object](10_000)

    async def collect(stream: Stream) -> None:
        async for msg in stream:
            await send.send(msg)

    address = "tcp://127.0.0.1:0" if transport == "tcp" else "inproc://"
    async with listen(address, collect) as lst:
        yield lst.address, recv


async def take(recv: trio.MemoryReceiveChannel[object], n: int) -> list[object]:
    with trio.fail_after(10):
        return [await recv.receive() for _ in range(n)]


async def test_receiver_sees_individual_messages_in_order(
    inbox: tuple[str, trio.MemoryReceiveChannel[object]],
) -> None:
    address, recv = inbox
    async with await connect(address) as stream, open_batched(stream) as batched:
        for i in range(2000):
            batched.send_nowait(("x", i))
            if i % 300 == 0:
                await trio.sleep(0.003)  # let some batches go out mid-way
        assert await take(recv, 2000) == [("x", i) for i in range(2000)]


async def test_messages_sent_together_go_out_as_one_batch(
    inbox: tuple[str, trio.MemoryReceiveChannel[object]],
) -> None:
    address, recv = inbox
    async with await connect(address) as stream:
        async with open_batched(stream, interval=0.05) as batched:
            for i in range(500):
                batched.send_nowait({"op": "task-finished", "key": ("x", i)})
        assert (batched.messages_sent, batched.batches_sent) == (500, 1)
        assert len(await take(recv, 500)) == 500


async def test_leaving_the_block_flushes_pending_messages(
    inbox: tuple[str, trio.MemoryReceiveChannel[object]],
) -> None:
    address, recv = inbox
    async with await connect(address) as stream:
        async with open_batched(stream, interval=3600) as batched:
            batched.send_nowait("a")
            batched.send_nowait("b")
        assert await take(recv, 2) == ["a", "b"]


async def test_send_writes_now_and_after_queued_messages(
    inbox: tuple[str, trio.MemoryReceiveChannel[object]],
) -> None:
    address, recv = inbox
    async with await connect(address) as stream, open_batched(stream, interval=3600) as batched:
        batched.send_nowait(1)
        await batched.send(2)
        assert await take(recv, 2) == [1, 2]


async def test_a_large_message_does_not_wait_for_the_interval(
    transport: str, inbox: tuple[str, trio.MemoryReceiveChannel[object]]
) -> None:
    if transport == "inproc":
        pytest.skip("in-process messages have no size; nothing is large")
    address, recv = inbox
    async with await connect(address) as stream, open_batched(stream, interval=3600) as batched:
        batched.send_nowait("small first")
        batched.send_nowait(b"x" * (1 << 20))
        got = await take(recv, 2)
        assert got[0] == "small first" and len(got[1]) == 1 << 20  # type: ignore[arg-type]


async def test_sending_to_a_lost_peer_raises(transport: str) -> None:
    async def close_at_once(stream: Stream) -> None:
        pass

    address = "tcp://127.0.0.1:0" if transport == "tcp" else "inproc://"
    async with listen(address, close_at_once) as lst:
        async with await connect(lst.address) as stream:
            with pytest.raises(trio.BrokenResourceError):
                async with open_batched(stream, interval=0.001) as batched:
                    for _ in range(1000):
                        batched.send_nowait("ping")
                        await trio.sleep(0.002)


async def test_unserializable_messages_are_dropped_and_logged(
    transport: str,
    inbox: tuple[str, trio.MemoryReceiveChannel[object]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    if transport == "inproc":
        pytest.skip("in-process messages are not serialized")
    address, recv = inbox
    async with await connect(address) as stream, open_batched(stream) as batched:
        with pytest.raises(SerializationError):
            await batched.send({"lock": threading.Lock()})  # awaited: raises right here
        batched.send_nowait("before")
        batched.send_nowait({"lock": threading.Lock()})  # queued: dropped at flush, logged
        batched.send_nowait("after")
        assert await take(recv, 2) == ["before", "after"]
    assert any("cannot be serialized" in r.getMessage() for r in caplog.records)


async def test_errors_in_the_block_propagate_unwrapped(
    inbox: tuple[str, trio.MemoryReceiveChannel[object]],
) -> None:
    address, recv = inbox
    async with await connect(address) as stream:
        with pytest.raises(KeyError):
            async with open_batched(stream):
                raise KeyError("mine")


async def test_batches_carry_big_nested_buffers_and_arrays(
    inbox: tuple[str, trio.MemoryReceiveChannel[object]],
) -> None:
    address, recv = inbox
    arr = np.arange(100_000, dtype="f8")
    msgs = [{"data": {("x", 0): b"x" * 100_000}}, ("small", 1), arr, [bytearray(b"y" * 70_000)]]
    async with await connect(address) as stream, open_batched(stream) as batched:
        for msg in msgs:
            batched.send_nowait(msg)
        got = await take(recv, 4)
    assert got[0] == msgs[0] and got[1] == ("small", 1) and got[3] == msgs[3]
    np.testing.assert_array_equal(got[2], arr)  # type: ignore[arg-type]


async def test_errors_in_the_block_survive_a_cancelled_enclosing_scope(
    inbox: tuple[str, trio.MemoryReceiveChannel[object]],
) -> None:
    # Regression: the block's error was kept and re-raised after the nursery; the
    # nursery's exit raised Cancelled first, the enclosing scope absorbed it, and the
    # KeyError vanished (execution went on after the `with`).
    address, recv = inbox
    async with await connect(address) as stream:
        with pytest.raises(KeyError, match="mine"):
            with trio.CancelScope() as outer:
                async with open_batched(stream):
                    outer.cancel()
                    raise KeyError("mine")


@pytest.fixture
def clock() -> MockClock:
    """Real time (``rate=1``) that a test can also ``jump``: pytest-trio runs the test on it."""
    return MockClock(rate=1.0)


async def test_a_message_after_a_quiet_spell_goes_out_at_once(
    inbox: tuple[str, trio.MemoryReceiveChannel[object]], clock: MockClock
) -> None:
    address, recv = inbox
    async with await connect(address) as stream:
        async with open_batched(stream, interval=1000) as batched:
            batched.send_nowait("first")  # nothing written yet: no waiting for the interval
            assert await take(recv, 1) == ["first"]
            clock.jump(1000)  # a quiet spell of one interval
            batched.send_nowait("lone")
            assert await take(recv, 1) == ["lone"]
            assert batched.batches_sent == 2


async def test_a_burst_is_coalesced_in_order(
    inbox: tuple[str, trio.MemoryReceiveChannel[object]], clock: MockClock
) -> None:
    address, recv = inbox
    async with await connect(address) as stream:
        async with open_batched(stream, interval=1000) as batched:
            batched.send_nowait(0)
            assert await take(recv, 1) == [0]
            for i in range(1, 100):
                batched.send_nowait(i)
                if i % 10 == 0:
                    await trio.lowlevel.checkpoint()  # the writer runs
            await trio.testing.wait_all_tasks_blocked()
            # Two quick writes in a row mark a burst: from then on the writer waits.
            sent = batched.batches_sent
            assert sent <= 3
            received = [recv.receive_nowait() for _ in range(batched.messages_sent - 1)]
            with pytest.raises(trio.WouldBlock):
                recv.receive_nowait()
            clock.jump(1000)  # the interval since the last write is over
            received += await take(recv, 99 - len(received))
            assert received == list(range(1, 100))
            assert (batched.batches_sent, batched.messages_sent) == (sent + 1, 100)


async def test_a_reply_soon_after_a_write_is_not_delayed(
    inbox: tuple[str, trio.MemoryReceiveChannel[object]], clock: MockClock
) -> None:
    address, recv = inbox
    async with await connect(address) as stream:
        async with open_batched(stream, interval=1000) as batched:
            batched.send_nowait("a")
            assert await take(recv, 1) == ["a"]
            batched.send_nowait("b")  # a quick second write: not yet a burst
            assert await take(recv, 1) == ["b"]
            clock.jump(300)  # less than the interval, more than a quick gap
            batched.send_nowait("c")
            assert await take(recv, 1) == ["c"]
            assert batched.batches_sent == 3


async def test_a_later_message_waits_for_the_next_write(
    inbox: tuple[str, trio.MemoryReceiveChannel[object]], clock: MockClock
) -> None:
    """``send_later`` (a report nothing waits on) wakes nobody: it goes with the next
    message, in order, in one write."""
    address, recv = inbox
    async with await connect(address) as stream:
        async with open_batched(stream, interval=1000) as batched:
            batched.send_later("report")
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.WouldBlock):
                recv.receive_nowait()
            batched.send_nowait("result")
            assert await take(recv, 2) == ["report", "result"]
            assert (batched.batches_sent, batched.messages_sent) == (1, 2)


async def test_a_later_message_goes_within_the_interval(
    inbox: tuple[str, trio.MemoryReceiveChannel[object]], clock: MockClock
) -> None:
    address, recv = inbox
    async with await connect(address) as stream:
        async with open_batched(stream, interval=1000) as batched:
            batched.send_later("report")
            await trio.testing.wait_all_tasks_blocked()
            clock.jump(1000)
            assert await take(recv, 1) == ["report"]


async def test_held_messages_are_written_by_flush_or_after_unhold(
    inbox: tuple[str, trio.MemoryReceiveChannel[object]], clock: MockClock
) -> None:
    address, recv = inbox
    async with await connect(address) as stream:
        async with open_batched(stream, interval=1000) as batched:
            batched.hold()
            batched.send_nowait(1)
            batched.send_nowait(2)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.WouldBlock):  # held: no write of its own
                recv.receive_nowait()
            await batched.flush()
            batched.unhold()
            assert await take(recv, 2) == [1, 2]
            batched.hold()
            batched.send_nowait(3)
            batched.unhold()  # not flushed: the writer writes it as usual
            assert await take(recv, 1) == [3]


async def test_a_write_without_waiting_that_fills_the_socket_is_finished_in_order(
    transport: str,
) -> None:
    """``flush_nowait`` writes what the socket takes at once; the rest (here: of a
    message larger than the socket's buffers, the reader not reading yet) is written by
    the writer task before anything sent after it."""
    go = trio.Event()
    send, recv = trio.open_memory_channel[object](10)

    async def slow_reader(stream: Stream) -> None:
        await go.wait()
        async for msg in stream:
            await send.send(msg)

    big = b"x" * (64 << 20)
    address = "tcp://127.0.0.1:0" if transport == "tcp" else "inproc://"
    async with listen(address, slow_reader) as lst, await connect(lst.address) as stream:
        async with open_batched(stream, interval=1000) as batched:
            batched.send_nowait(big)
            assert batched.flush_nowait() is False  # (inproc: never without the writer)
            batched.send_nowait("after")
            assert batched.flush_nowait() is False
            go.set()
            got = await take(recv, 2)
            assert len(got[0]) == len(big) and got[1] == "after"  # type: ignore[arg-type]


async def test_a_write_without_waiting_goes_at_once(
    inbox: tuple[str, trio.MemoryReceiveChannel[object]], clock: MockClock, transport: str
) -> None:
    address, recv = inbox
    async with await connect(address) as stream:
        async with open_batched(stream, interval=1000) as batched:
            batched.hold()
            batched.send_nowait("done")
            assert batched.flush_nowait() is (transport == "tcp")
            batched.unhold()
            assert await take(recv, 1) == ["done"]
            assert batched.batches_sent == 1
