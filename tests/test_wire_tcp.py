"""TCP only: big arrays, version refusal, and bad bytes that close just one connection.

Each test runs twice: over loopback TCP itself, and with ``connect`` taking the
same-host shortcut (a Unix socket, wire/unix_route.py) where it can. Raw sockets
(strangers, attackers) always come by TCP.
"""

from __future__ import annotations

import logging
import struct
from functools import partial

import numpy as np
import pytest
import trio

from trioscheduler.wire import PROTOCOL_VERSION, ProtocolVersionError, Stream, connect, listen
from trioscheduler.wire.handshake import make_hello
from trioscheduler.wire.serialize import dumps
from trioscheduler.wire.tcp import frame_prefix
from trioscheduler.wire.unix_route import ENV


@pytest.fixture(autouse=True, params=["tcp", "unix"])
def _shortcut(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "1" if request.param == "unix" else "0")


def encode(msg: object) -> bytes:
    frames = dumps(msg)
    return frame_prefix(frames) + b"".join(bytes(f) for f in frames)


HELLO = encode(make_hello("client", {}))


async def echo(stream: Stream) -> None:
    async for msg in stream:
        await stream.send(msg)


async def raw_exchange(address: str, data: bytes) -> bytes:
    """Send ``data`` on a bare socket, half-close, and read until the listener hangs up."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    sock = await trio.open_tcp_stream(host, int(port))
    received = bytearray()
    try:
        await sock.send_all(data)
        await sock.send_eof()
        while chunk := await sock.receive_some():
            received += chunk
    except trio.BrokenResourceError:
        pass  # the listener reset the connection: that also counts as hanging up
    finally:
        await sock.aclose()
    return bytes(received)


def wire_logs(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "trioscheduler.wire")


async def test_200_mb_numpy_array_arrives_equal() -> None:
    arr = np.random.default_rng(1).integers(0, 2**62, size=25_000_000, dtype="i8")  # 200 MB
    received: list[np.ndarray] = []

    async def keep(stream: Stream) -> None:
        received.append(await stream.receive())
        await stream.send("got it")

    async with listen("tcp://127.0.0.1:0", keep) as lst:
        async with await connect(lst.address) as stream:
            await stream.send({"key": ("x", 0), "value": arr})
            assert await stream.receive() == "got it"
    assert np.array_equal(received[0]["value"], arr)


async def test_version_mismatch_is_refused_naming_both_versions(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Our listener, a peer from the future.
    async with listen("tcp://127.0.0.1:0", echo) as lst:
        await raw_exchange(lst.address, encode(make_hello("client", {}, version=99)))
    logs = wire_logs(caplog)
    assert "version 99" in logs and f"version {PROTOCOL_VERSION}" in logs

    # A listener from the future, our client.
    async def future_server(sock_stream: trio.SocketStream) -> None:
        await sock_stream.send_all(encode(make_hello("scheduler", {}, version=99)))
        await sock_stream.receive_some()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), future_server, 0)
        port = listeners[0].socket.getsockname()[1]
        with pytest.raises(ProtocolVersionError, match=f"version 99.*version {PROTOCOL_VERSION}"):
            await connect(f"tcp://127.0.0.1:{port}", timeout=5)
        nursery.cancel_scope.cancel()


def message_with_frame_lengths(*lengths: int) -> bytes:
    return struct.pack(f"<I{len(lengths)}Q", len(lengths), *lengths)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "bad message"),
        (message_with_frame_lengths(2**40), "exceeds the limit"),
        (HELLO + message_with_frame_lengths(2**40), "exceeds the limit"),
        (HELLO + message_with_frame_lengths(100) + b"short", "middle of a message"),
        (HELLO + struct.pack("<I", 0), "0 frames"),
        (HELLO + message_with_frame_lengths(1) + b"\xc1", "bad message"),
        (HELLO + encode(["a", ValueError("x")]).replace(b"builtins", b"nomodule"), "nomodule"),
        (encode({"protocol": "http"}), "not a trioscheduler peer"),
    ],
)
async def test_bad_input_closes_that_connection_with_a_reason(
    payload: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with listen("tcp://127.0.0.1:0", echo, max_frame_bytes=1 << 20) as lst:
        async with await connect(lst.address) as bystander:
            with trio.fail_after(10):
                await raw_exchange(lst.address, payload)
            logs = wire_logs(caplog)
            assert reason in logs
            assert "tcp://127.0.0.1:" in logs  # names the peer
            await bystander.send("still fine")
            assert await bystander.receive() == "still fine"


async def test_silent_peer_is_dropped_after_the_handshake_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with listen("tcp://127.0.0.1:0", echo, handshake_timeout=0.2) as lst:
        host, port = lst.address.removeprefix("tcp://").rsplit(":", 1)
        sock = await trio.open_tcp_stream(host, int(port))
        with trio.fail_after(10):
            while await sock.receive_some():  # our hello, then the hang-up
                pass
        await sock.aclose()
    assert "not identified within 0.2 s" in wire_logs(caplog)


async def test_frame_limit_applies_to_clients_too() -> None:
    async def send_big(stream: Stream) -> None:
        await stream.send(b"x" * (2 << 20))
        await stream.receive()

    async with listen("tcp://127.0.0.1:0", send_big) as lst:
        async with await connect(lst.address, max_frame_bytes=1 << 20) as stream:
            with pytest.raises(trio.BrokenResourceError, match="exceeds the limit"):
                await stream.receive()
            assert stream.closed


@pytest.fixture(autouse=True)
def _wire_logs_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="trioscheduler.wire")


async def test_received_arrays_never_share_memory_while_held() -> None:
    """Large receive buffers are recycled only after the user dropped them."""
    rng = np.random.default_rng(2)
    sent = [rng.random(400_000) for _ in range(6)]  # 3.2 MB each, all the same size
    held: list[np.ndarray] = []

    async def keep(stream: Stream) -> None:
        for i in range(6):
            arr = await stream.receive()
            if i < 3:
                held.append(arr)  # keep the first three, drop the rest at once
        await stream.send("done")

    async with listen("tcp://127.0.0.1:0", keep) as lst:
        async with await connect(lst.address) as stream:
            for arr in sent:
                await stream.send(arr)
            assert await stream.receive() == "done"
    for mine, theirs in zip(held, sent[:3], strict=True):
        np.testing.assert_array_equal(mine, theirs)
    assert not any(np.shares_memory(a, b) for i, a in enumerate(held) for b in held[i + 1 :])


async def _silent_after_hello(address: str) -> trio.SocketStream:
    """A connection that completes the hello and then says nothing."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    sock = await trio.open_tcp_stream(host, int(port))
    await sock.send_all(HELLO)
    return sock


async def _until_closed(sock: trio.SocketStream) -> None:
    with trio.fail_after(30):  # a hang guard, not a timing assertion
        try:
            while await sock.receive_some():  # the listener's hello, then the hang-up
                pass
        except trio.BrokenResourceError:
            pass
    await sock.aclose()


async def test_silence_after_the_hello_is_bounded_in_time(caplog: pytest.LogCaptureFixture) -> None:
    async with listen("tcp://127.0.0.1:0", echo, handshake_timeout=0.3, peer_speaks_first=True) as lst:
        silent = [await _silent_after_hello(lst.address) for _ in range(20)]
        async with await connect(lst.address) as client:  # served meanwhile
            await client.send("hi")
            assert await client.receive() == "hi"
        for sock in silent:
            await _until_closed(sock)  # each one is closed by the listener
        assert lst.unidentified == 0
    # twenty refusals, one warning line (the rest at debug level)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("not identified within 0.3 s" in w for w in warnings) == 1
    assert wire_logs(caplog).count("not identified within 0.3 s") == 20


async def test_unidentified_connections_are_bounded_in_number() -> None:
    async with listen("tcp://127.0.0.1:0", echo, max_unidentified=50, peer_speaks_first=True) as lst:
        silent = []
        for _ in range(200):  # 200 silent peers: at most 50 held at once, oldest evicted
            silent.append(await _silent_after_hello(lst.address))
            assert lst.unidentified <= 50
        async with await connect(lst.address) as client:  # a real peer still gets in
            await client.send("hi")
            assert await client.receive() == "hi"
        for sock in silent[:100]:
            await _until_closed(sock)  # the oldest were closed long before the time-out
        assert lst.unidentified <= 50
        for sock in silent[100:]:
            await sock.aclose()
