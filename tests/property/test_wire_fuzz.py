"""Fuzz a live TCP listener with 1,200 random and mutated byte strings.

Every input gets its own connection; the listener must close each one (we half-close
and wait for its hang-up, so a listener that hangs fails the test), log why, and
afterwards still serve a well-behaved client. Inputs are seeded, so a failure
reproduces; they mix pure noise with mutations of real traffic (handshake, messages
with frames, pickles), which is what reaches the deeper parsers.
"""

from __future__ import annotations

import logging
import random
import struct

import numpy as np
import pytest
import trio

from trioscheduler.core import messages
from trioscheduler.wire import Stream, connect, listen
from trioscheduler.wire.handshake import make_hello
from trioscheduler.wire.serialize import dumps
from trioscheduler.wire.tcp import frame_prefix

N_INPUTS = 1200


def encode(msg: object) -> bytes:
    frames = dumps(msg)
    return frame_prefix(frames) + b"".join(bytes(f) for f in frames)


HELLO = encode(make_hello("client", {"name": "fuzz"}))
SAMPLES = [
    encode({"op": "ping", "key": ("x", 1)}),
    encode([messages.FreeKeys("s", 1.0, [("a", 0), "b"]), b"y" * 20_000]),
    encode({"array": np.arange(40, dtype="f8").reshape(5, 8)[:, ::2], "f": ValueError("e")}),
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        pos = rng.randrange(len(b) + 1)
        if kind == 0 and b:  # flip bits
            b[min(pos, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncate
            del b[pos:]
        elif kind == 2:  # insert noise
            b[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif kind == 3:  # delete a span
            del b[pos : pos + rng.randint(1, 16)]
        elif kind == 4 and len(b) >= pos + 8:  # a wild length or count
            b[pos : pos + 8] = struct.pack(
                "<Q", rng.choice([0, 1, 2**31, 2**63, rng.getrandbits(64)])
            )
        else:  # set a byte to a msgpack type marker
            if b:
                b[min(pos, len(b) - 1)] = rng.choice([0xC1, 0xC7, 0xD4, 0xDD, 0xDF, 0x00, 0xFF])
    return bytes(b)


def fuzz_inputs(seed: int = 20261126) -> list[bytes]:
    rng = random.Random(seed)
    out: list[bytes] = []
    for i in range(N_INPUTS):
        kind = i % 4
        if kind == 0:
            out.append(rng.randbytes(rng.randint(0, 300)))
        elif kind == 1:
            out.append(mutate(rng, HELLO))
        else:
            out.append(HELLO + mutate(rng, rng.choice(SAMPLES)))
    return out


async def echo(stream: Stream) -> None:
    async for msg in stream:
        await stream.send(msg)


async def throw(address: str, data: bytes) -> None:
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    sock = await trio.open_tcp_stream(host, int(port))
    try:
        await sock.send_all(data)
        await sock.send_eof()
        while await sock.receive_some(1 << 16):
            pass
    except trio.BrokenResourceError:
        pass  # reset by the listener: a hang-up too
    finally:
        await sock.aclose()


async def test_listener_survives_garbage(caplog: pytest.LogCaptureFixture) -> None:
    # refusals before the hello are warnings at most once per 10 s, the rest at debug
    caplog.set_level(logging.DEBUG, logger="trioscheduler.wire")
    inputs = fuzz_inputs()
    assert len(inputs) >= 1000
    async with listen("tcp://127.0.0.1:0", echo, max_frame_bytes=1 << 20) as lst:
        async with await connect(lst.address) as bystander:
            with trio.fail_after(120):
                limiter = trio.CapacityLimiter(8)

                async def one(data: bytes) -> None:
                    async with limiter:
                        await throw(lst.address, data)

                async with trio.open_nursery() as nursery:
                    for data in inputs:
                        nursery.start_soon(one, data)
            # The connection opened before the storm still works, and so does a new one.
            await bystander.send({"still": ("alive", 1)})
            assert await bystander.receive() == {"still": ("alive", 1)}
        async with await connect(lst.address) as stream:
            msg = {"key": ("x", 0), "data": np.arange(10)}
            await stream.send(msg)
            back = await stream.receive()
            assert back["key"] == ("x", 0) and np.array_equal(back["data"], msg["data"])
    refusals = [
        r.getMessage()
        for r in caplog.records
        if r.name == "trioscheduler.wire" and "ed connection from" in r.getMessage()
    ]
    assert len(refusals) > N_INPUTS // 2  # most inputs are refused, with a logged reason
    assert all("tcp://127.0.0.1:" in text for text in refusals)
