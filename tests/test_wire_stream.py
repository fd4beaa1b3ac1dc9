"""Stream semantics, identical over every transport: one module, parametrized.

``tcp`` is loopback TCP itself (the same-host shortcut turned off), ``unix`` a
``tcp://`` address reached through the shortcut's Unix socket, ``inproc`` in-process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from trioscheduler import TrioSchedulerError
from trioscheduler.wire import ConnectError, Stream, connect, listen, open_batched
from trioscheduler.wire.unix_route import ENV

pytestmark = pytest.mark.parametrize("transport", ["tcp", "unix", "inproc"])


@pytest.fixture(autouse=True)
def _shortcut(transport: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "1" if transport == "unix" else "0")


def any_address(transport: str) -> str:
    return "inproc://" if transport == "inproc" else "tcp://127.0.0.1:0"


def scheme(transport: str) -> str:
    """The scheme of ``transport``'s listener addresses."""
    return "inproc" if transport == "inproc" else "tcp"


async def echo(stream: Stream) -> None:
    async for msg in stream:
        await stream.send(msg)


async def until_broken(stream: Stream) -> None:
    """Send until the transport notices the peer is gone (TCP needs a round trip)."""
    for _ in range(1000):
        await stream.send("ping")
        await trio.sleep(0.001)


@pytest.fixture
async def echo_address(transport: str) -> AsyncIterator[str]:
    async with listen(any_address(transport), echo) as listener:
        yield listener.address


async def test_round_trip_and_peer_info(transport: str) -> None:
    async with listen(any_address(transport), echo, role="worker", info={"nthreads": 4}) as lst:
        assert lst.address.startswith(scheme(transport) + "://")
        assert not lst.address.endswith(":0") and lst.address != "inproc://"
        async with await connect(lst.address, info={"name": "me"}) as stream:
            assert stream.peer_role == "worker"
            assert stream.peer_info == {"nthreads": 4}
            assert stream.peer_address == lst.address
            # the connection's own end says which transport carries it
            assert stream.local_address.startswith("unix:" if transport == "unix" else scheme(transport))
            msg = {"op": "compute", "keys": [("x", 0), ("x", 1)], "data": b"\x00" * 10}
            await stream.send(msg)
            assert await stream.receive() == msg


async def test_handler_sees_client_role_and_info(transport: str) -> None:
    seen: list[tuple[str, dict[str, Any], str]] = []

    async def handler(stream: Stream) -> None:
        seen.append((stream.peer_role, stream.peer_info, stream.peer_address))
        await stream.send("hi")

    async with listen(any_address(transport), handler) as lst:
        async with await connect(lst.address, role="worker", info={"name": "w1"}) as stream:
            assert await stream.receive() == "hi"
            role, info, peer = seen[0]
            assert (role, info) == ("worker", {"name": "w1"})
            assert peer == stream.local_address


async def test_messages_keep_order(echo_address: str) -> None:
    async with await connect(echo_address) as stream:
        async with trio.open_nursery() as nursery:

            async def produce() -> None:
                for i in range(500):
                    await stream.send(("m", i))

            nursery.start_soon(produce)
            got = [await stream.receive() for _ in range(500)]
        assert got == [("m", i) for i in range(500)]


async def test_iteration_ends_when_peer_closes(transport: str) -> None:
    async def three_then_close(stream: Stream) -> None:
        for i in range(3):
            await stream.send(i)

    async with listen(any_address(transport), three_then_close) as lst:
        async with await connect(lst.address) as stream:
            assert [m async for m in stream] == [0, 1, 2]
            with pytest.raises(trio.EndOfChannel):
                await stream.receive()


async def test_send_after_close_is_closed_resource_error(echo_address: str) -> None:
    stream = await connect(echo_address)
    await stream.aclose()
    await stream.aclose()  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        await stream.send("x")
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive()


async def test_peer_gone_is_broken_on_send_and_end_on_receive(transport: str) -> None:
    async def close_at_once(stream: Stream) -> None:
        pass

    async with listen(any_address(transport), close_at_once) as lst:
        async with await connect(lst.address) as stream:
            with pytest.raises(trio.EndOfChannel):
                await stream.receive()
            with pytest.raises(trio.BrokenResourceError):
                await stream.send("x")
        # Without receiving first, sending notices the loss too.
        async with await connect(lst.address) as stream:
            with pytest.raises(trio.BrokenResourceError):
                await until_broken(stream)


async def test_client_closing_ends_the_handler(transport: str) -> None:
    ended = trio.Event()

    async def handler(stream: Stream) -> None:
        async for _ in stream:
            pass
        ended.set()

    async with listen(any_address(transport), handler) as lst:
        stream = await connect(lst.address)
        await stream.send(1)
        await stream.aclose()
        with trio.fail_after(10):
            await ended.wait()


async def test_failing_handler_closes_only_its_connection(
    transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(stream: Stream) -> None:
        async for msg in stream:
            if msg == "boom":
                raise RuntimeError("handler exploded")
            await stream.send(msg)

    async with listen(any_address(transport), handler) as lst:
        async with await connect(lst.address) as good, await connect(lst.address) as bad:
            await bad.send("boom")
            with pytest.raises(trio.EndOfChannel):
                await bad.receive()
            await good.send("still here")
            assert await good.receive() == "still here"
            async with await connect(lst.address) as late:
                await late.send(1)
                assert await late.receive() == 1
    records = [r for r in caplog.records if r.name == "trioscheduler.wire"]
    assert any("handler exploded" in (r.exc_text or "") for r in records)
    assert any(bad.local_address in r.getMessage() for r in records)


async def test_leaving_listen_closes_its_connections(transport: str) -> None:
    async with listen(any_address(transport), echo) as lst:
        stream = await connect(lst.address)
        await stream.send(1)
        assert await stream.receive() == 1
    with trio.fail_after(10):
        with pytest.raises(trio.EndOfChannel):
            await stream.receive()
    await stream.aclose()


async def test_connect_waits_for_a_late_listener(transport: str) -> None:
    if transport != "inproc":
        # Find a free port, release it, and listen on it a moment after connecting.
        async with listen("tcp://127.0.0.1:0", echo) as probe:
            address = probe.address
    else:
        address = "inproc://late-listener"

    async with trio.open_nursery() as nursery:

        async def late_listen(task_status: trio.TaskStatus[None]) -> None:
            task_status.started()
            await trio.sleep(0.2)
            async with listen(address, echo):
                await trio.sleep_forever()

        await nursery.start(late_listen)
        async with await connect(address, timeout=20) as stream:
            await stream.send("hello")
            assert await stream.receive() == "hello"
        nursery.cancel_scope.cancel()


async def test_connect_times_out_naming_the_address(transport: str) -> None:
    address = "inproc://nobody-home" if transport == "inproc" else "tcp://127.0.0.1:1"
    with pytest.raises(ConnectError, match=address.replace(".", r"\.")) as info:
        await connect(address, timeout=0.3)
    assert isinstance(info.value, TrioSchedulerError)
    assert isinstance(info.value, OSError)


async def test_many_concurrent_connections(echo_address: str) -> None:
    results: list[int] = []

    async def one(i: int) -> None:
        async with await connect(echo_address) as stream:
            await stream.send(i)
            results.append(await stream.receive())

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(one, i)
    assert sorted(results) == list(range(50))



async def test_errors_in_the_listen_block_propagate_unwrapped(transport: str) -> None:
    with pytest.raises(KeyError):
        async with listen(any_address(transport), echo):
            raise KeyError("mine")


async def test_errors_in_the_listen_block_survive_a_cancelled_enclosing_scope(
    transport: str,
) -> None:
    # Regression: the nursery's exit raised Cancelled before the kept error was
    # re-raised; the enclosing scope absorbed the Cancelled and the KeyError was lost.
    with pytest.raises(KeyError, match="mine"):
        with trio.CancelScope() as outer:
            async with listen(any_address(transport), echo):
                outer.cancel()
                raise KeyError("mine")


async def send_batch(stream: Stream, msgs: list[Any]) -> None:
    """Write ``msgs`` as one batch (over TCP the receiver decodes them all at once)."""
    async with open_batched(stream, interval=3600) as batched:
        for msg in msgs:
            batched.send_nowait(msg)


async def test_receive_batch_and_receive_nowait_take_what_is_here(transport: str) -> None:
    async def five(stream: Stream) -> None:
        assert await stream.receive() == "go"  # not before the client looked
        await send_batch(stream, [("m", i) for i in range(5)])
        await stream.receive()  # stay open until the client is done

    async with listen(any_address(transport), five) as lst:
        async with await connect(lst.address) as stream:
            with pytest.raises(trio.WouldBlock):
                stream.receive_nowait()  # nothing here yet
            await stream.send("go")
            got = await stream.receive_batch()
            while len(got) < 5:
                got += await stream.receive_batch()
            assert got == [("m", i) for i in range(5)]
            with pytest.raises(trio.WouldBlock):
                stream.receive_nowait()
            await stream.send("done")


async def test_iteration_keeps_nothing_back_after_break(transport: str) -> None:
    async def five_then_close(stream: Stream) -> None:
        await send_batch(stream, list(range(5)))

    async with listen(any_address(transport), five_then_close) as lst:
        async with await connect(lst.address) as stream:
            async for msg in stream:
                if msg == 1:
                    break
            assert stream.receive_nowait() == 2  # sent in one batch: already here
            assert [m async for m in stream] == [3, 4]
            with pytest.raises(trio.EndOfChannel):
                stream.receive_nowait()
            with pytest.raises(trio.EndOfChannel):
                await stream.receive()
        with pytest.raises(trio.ClosedResourceError):
            stream.receive_nowait()
