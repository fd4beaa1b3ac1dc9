"""Wire workloads: large arrays against the raw socket limit, small messages against dask.

* ``wire-large``: MB/s of 200 MB numpy arrays over our TCP stream, against a plain
  ``socket.sendall`` / ``recv_into`` loop on loopback. Both sides run sender and
  receiver in two threads of one process; ours receives each array into a fresh
  buffer that becomes the user's array, the raw loop reuses one buffer (the limit).
* ``wire-small``: messages/s of ~100-byte messages, ours through ``open_batched``
  against ``distributed.comm`` TCP with one awaited ``write`` per message (the
  comparison the wire issue asks for). One event loop holds both ends.
* ``wire-small-vs-batchedsend``: the stricter comparison, against ``distributed``'s
  own ``BatchedSend`` (what its scheduler uses for small messages).
* ``wire-small-unbatched``: one awaited send each on both sides.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import trio

from benchmarks._harness import register
from trioscheduler.wire import Stream, connect, listen, open_batched

LARGE_BYTES = 200 * 1024 * 1024
LARGE_COUNT = 3
SMALL_COUNT = 200_000
YIELD_EVERY = 100  # a producer that does other work between messages


def small_message(i: int) -> dict[str, Any]:
    return {"op": "task-finished", "key": ("inc", i), "nbytes": 8, "data": b"x" * 48}


# ------------------------------------------------------------------------- large arrays


def _large_array(quick: bool) -> tuple[np.ndarray, int]:
    size = LARGE_BYTES // (10 if quick else 1)
    arr = np.random.default_rng(0).integers(0, 255, size=size, dtype="u1")
    return arr, (1 if quick else LARGE_COUNT)


def _in_threads(receiver: Callable[[queue.Queue[Any]], float], sender: Callable[[Any], float]) -> tuple[float, float]:
    """Run ``receiver`` (which puts its address on the queue) and ``sender(address)``."""
    q: queue.Queue[Any] = queue.Queue()
    out: dict[str, float] = {}
    errors: list[BaseException] = []

    def recv_main() -> None:
        try:
            out["end"] = receiver(q)
        except BaseException as e:
            errors.append(e)
            q.put(None)

    t = threading.Thread(target=recv_main)
    t.start()
    address = q.get()
    if address is not None:
        try:
            out["start"] = sender(address)
        except BaseException as e:
            errors.append(e)
    t.join()
    if errors:
        raise errors[0]
    return out["start"], out["end"]


def ours_large(quick: bool) -> float:
    arr, count = _large_array(quick)

    def receiver(q: queue.Queue[Any]) -> float:
        done: list[float] = []

        async def main() -> None:
            finished = trio.Event()

            async def handler(stream: Stream) -> None:
                for _ in range(count):
                    got = await stream.receive()
                    assert got.nbytes == arr.nbytes
                    del got
                done.append(time.perf_counter())
                finished.set()

            async with listen("tcp://127.0.0.1:0", handler) as lst:
                q.put(lst.address)
                await finished.wait()

        trio.run(main)
        return done[0]

    def sender(address: str) -> float:
        async def main() -> float:
            async with await connect(address) as stream:
                start = time.perf_counter()
                for _ in range(count):
                    await stream.send(arr)
                return start

        return trio.run(main)

    start, end = _in_threads(receiver, sender)
    return arr.nbytes * count / (end - start) / 1e6


def raw_large(quick: bool) -> float:
    arr, count = _large_array(quick)
    nbytes = arr.nbytes

    def receiver(q: queue.Queue[Any]) -> float:
        with socket.create_server(("127.0.0.1", 0)) as server:
            q.put(server.getsockname())
            conn, _ = server.accept()
            with conn:
                buf = bytearray(nbytes)
                view = memoryview(buf)
                for _ in range(count):
                    got = 0
                    while got < nbytes:
                        n = conn.recv_into(view[got:])
                        if not n:
                            raise ConnectionError("sender went away")
                        got += n
                return time.perf_counter()

    def sender(address: Any) -> float:
        with socket.create_connection(address) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            data = memoryview(arr)
            start = time.perf_counter()
            for _ in range(count):
                sock.sendall(data)
            return start

    start, end = _in_threads(receiver, sender)
    return nbytes * count / (end - start) / 1e6


# ----------------------------------------------------------------------- small messages


def ours_small(quick: bool, batched: bool = True) -> float:
    n = SMALL_COUNT // (10 if quick else 1)
    if not batched:
        n //= 4
    msgs = [small_message(i) for i in range(n)]

    async def main() -> float:
        done = trio.Event()

        async def handler(stream: Stream) -> None:
            for _ in range(n):
                await stream.receive()
            done.set()

        async with listen("tcp://127.0.0.1:0", handler) as lst:
            async with await connect(lst.address) as stream:
                start = time.perf_counter()
                if batched:
                    async with open_batched(stream) as b:
                        for i, msg in enumerate(msgs):
                            b.send_nowait(msg)
                            if i % YIELD_EVERY == 0:
                                await trio.lowlevel.checkpoint()
                else:
                    for msg in msgs:
                        await stream.send(msg)
                await done.wait()
                return n / (time.perf_counter() - start)

    return trio.run(main)


def distributed_small(quick: bool, batched: bool = True) -> float:
    """``distributed.comm`` TCP: its ``BatchedSend`` if ``batched``, else one ``write`` each."""
    from distributed.batched import BatchedSend
    from distributed.comm import connect as d_connect
    from distributed.comm import listen as d_listen

    logging.getLogger("distributed").setLevel(logging.ERROR)
    n = SMALL_COUNT // (10 if quick else 1)
    if not batched:
        n //= 4
    msgs = [small_message(i) for i in range(n)]

    async def main() -> float:
        done = asyncio.Event()

        async def handler(comm: Any) -> None:
            count = 0
            while count < n:
                got = await comm.read()
                if batched:
                    for _ in got:  # what a receiver does with a batch: go through it
                        count += 1
                else:
                    count += 1
            done.set()

        listener = await d_listen("tcp://127.0.0.1:0", handler)
        await listener.start()
        comm = await d_connect(listener.contact_address)
        start = time.perf_counter()
        if batched:
            b = BatchedSend(interval="2ms")
            b.start(comm)
            for i, msg in enumerate(msgs):
                b.send(msg)
                if i % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
        else:
            for msg in msgs:
                await comm.write(msg)
        await done.wait()
        rate = n / (time.perf_counter() - start)
        if batched:
            await b.close()
        await comm.close()
        listener.stop()
        return rate

    return asyncio.run(main())


register(
    "wire-large",
    description="200 MB numpy arrays over one TCP connection on loopback (MB/s).",
    unit="MB/s",
    ours=ours_large,
    reference=raw_large,
    reference_label="raw socket.sendall",
    target=0.8,
)
register(
    "wire-small",
    description=(
        "~100-byte messages: ours batched (open_batched) against distributed.comm TCP "
        "with one awaited comm.write per message (messages/s)."
    ),
    unit="msg/s",
    ours=ours_small,
    reference=lambda quick: distributed_small(quick, batched=False),
    reference_label="distributed.comm TCP write",
    target=2.0,
)
register(
    "wire-small-vs-batchedsend",
    description=(
        "~100-byte messages, both batched: ours (open_batched) against distributed's "
        "BatchedSend on distributed.comm TCP, 2 ms interval on both (messages/s)."
    ),
    unit="msg/s",
    ours=ours_small,
    reference=distributed_small,
    reference_label="distributed BatchedSend",
    target=2.0,
)
register(
    "wire-small-unbatched",
    description="~100-byte messages, one awaited send each on both sides (messages/s).",
    unit="msg/s",
    ours=lambda quick: ours_small(quick, batched=False),
    reference=lambda quick: distributed_small(quick, batched=False),
    reference_label="distributed.comm TCP write",
    target=2.0,
)
