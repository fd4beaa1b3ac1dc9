"""Wire workloads: large arrays against the raw socket limit, small messages against dask.

* ``wire-large``: MB/s of 200 MB numpy arrays over our TCP stream, against a plain
  ``socket.sendall`` / ``recv_into`` loop on loopback. Both sides run sender and
  receiver in two threads of one process; ours receives each array into a fresh
  buffer that becomes the user's array, the raw loop reuses one buffer (the limit).
* ``wire-small``: messages/s of ~100-byte messages, ours through ``open_batched``
  against ``distributed.comm`` TCP with one awaited ``write`` per message (the
  comparison the wire issue asks for). One event loop holds both ends.
* ``wire-small-vs-batchedsend``: the stricter comparison, against ``distributed``'s
  own ``BatchedSend`` (what its scheduler uses for small messages); both receivers go
  through each batch as a list. ``-iter``: ours takes messages one by one (``async for``).
* ``wire-small-unbatched``: one awaited send each on both sides.
* ``wire-rtt-p50`` / ``wire-rtt-p99``: round trip of a tiny message over TCP loopback
  (send, the peer echoes it, receive), in microseconds, ours ``Stream.send``/``receive``
  against ``distributed.comm`` ``write``/``read``. One event loop holds both ends.
* ``wire-shortcut-rtt-p50`` / ``wire-shortcut-large``: ours through the same-host
  shortcut (a Unix socket under the ``tcp://`` address, wire/unix_route.py) against
  ours over loopback TCP: the ratio is what the shortcut saves. Every other ``wire-*``
  row runs ours over TCP itself (the shortcut off), like for like with dask's TCP.
* ``wire-rtt-batched-p50``: the same round trip with both ends sending through their
  batched senders (``open_batched`` against distributed's ``BatchedSend``, 2 ms
  interval), the way scheduler, workers and clients talk, each ping sent after a quiet
  spell of more than the interval (not timed): a lone message must not wait for the
  interval. (Back-to-back pings faster than the interval are coalesced on both sides,
  as bursts should be: ~2 ms per hop.)
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import queue
import socket
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import trio

from benchmarks._harness import register
from trioscheduler.wire import Stream, connect, listen, open_batched
from trioscheduler.wire.unix_route import ENV as SHORTCUT_ENV

T = TypeVar("T")


def over_tcp(fn: Callable[..., T], shortcut: bool = False) -> Callable[..., T]:
    """``fn`` with the same-host shortcut off (loopback TCP itself), or on."""

    def run(*args: Any, **kwargs: Any) -> T:
        before = os.environ.get(SHORTCUT_ENV)
        os.environ[SHORTCUT_ENV] = "1" if shortcut else "0"
        try:
            return fn(*args, **kwargs)
        finally:
            if before is None:
                del os.environ[SHORTCUT_ENV]
            else:
                os.environ[SHORTCUT_ENV] = before

    return run

LARGE_BYTES = 200 * 1024 * 1024
LARGE_COUNT = 3
SMALL_COUNT = 200_000
YIELD_EVERY = 100  # a producer that does other work between messages


def _frozen(msgs: list[Any]) -> list[Any]:
    """The pre-built input out of the garbage collector's sight (``gc.freeze``), on both
    sides alike: otherwise every full collection walks all of it, a cost of this set-up
    (no real sender holds 200k messages) that would swamp what is measured.
    """
    gc.collect()
    gc.freeze()
    return msgs


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


def ours_large(
    quick: bool,
    scheme: str = "tcp",
    server_args: dict[str, Any] | None = None,
    client_args: dict[str, Any] | None = None,
) -> float:
    """``scheme`` and the listener's/connector's keywords: ``benchmarks/tls.py`` runs
    the same over TLS."""
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

            async with listen(f"{scheme}://127.0.0.1:0", handler, **(server_args or {})) as lst:
                q.put(lst.address)
                await finished.wait()

        trio.run(main)
        return done[0]

    def sender(address: str) -> float:
        async def main() -> float:
            async with await connect(address, **(client_args or {})) as stream:
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


def ours_small(quick: bool, batched: bool = True, lists: bool = False) -> float:
    """``lists``: the receiver takes lists with ``receive_batch`` (as distributed's
    receiver gets each batch as a list), else one message at a time with ``async for``.
    """
    n = SMALL_COUNT // (10 if quick else 1)
    if not batched:
        n //= 4
    msgs = _frozen([small_message(i) for i in range(n)])

    async def main() -> float:
        done = trio.Event()

        async def handler(stream: Stream) -> None:
            count = 0
            if lists:
                while count < n:
                    for _ in await stream.receive_batch():
                        count += 1
            else:
                async for _ in stream:  # what the shells do
                    count += 1
                    if count == n:
                        break
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

    try:
        return trio.run(main)
    finally:
        gc.unfreeze()


def distributed_small(quick: bool, batched: bool = True) -> float:
    """``distributed.comm`` TCP: its ``BatchedSend`` if ``batched``, else one ``write`` each."""
    from distributed.batched import BatchedSend
    from distributed.comm import connect as d_connect
    from distributed.comm import listen as d_listen

    logging.getLogger("distributed").setLevel(logging.ERROR)
    n = SMALL_COUNT // (10 if quick else 1)
    if not batched:
        n //= 4
    msgs = _frozen([small_message(i) for i in range(n)])

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

    try:
        return asyncio.run(main())
    finally:
        gc.unfreeze()


# --------------------------------------------------------------------- round trips

RTT_COUNT = 2000
RTT_WARMUP = 50
QUIET = 0.0025  # between batched pings: more than the 2 ms interval


def rtt_message(i: int) -> dict[str, Any]:
    return {"op": "ping", "key": ("x", i)}


def _percentile(samples: list[float], q: float) -> float:
    """``q``-th percentile in microseconds."""
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1] * 1e6


def ours_rtt(
    quick: bool,
    batched: bool = False,
    scheme: str = "tcp",
    server_args: dict[str, Any] | None = None,
    client_args: dict[str, Any] | None = None,
) -> list[float]:
    n = RTT_COUNT // (10 if quick else 1) // (4 if batched else 1)

    async def main() -> list[float]:
        async def echo(stream: Stream) -> None:
            if batched:
                async with open_batched(stream) as b:
                    async for msg in stream:
                        b.send_nowait(msg)
            else:
                async for msg in stream:
                    await stream.send(msg)

        samples = []
        async with listen(f"{scheme}://127.0.0.1:0", echo, **(server_args or {})) as lst:
            async with await connect(lst.address, **(client_args or {})) as stream:
                if batched:
                    async with open_batched(stream) as b:
                        for i in range(n + RTT_WARMUP):
                            await trio.sleep(QUIET)
                            start = time.perf_counter()
                            b.send_nowait(rtt_message(i))
                            await stream.receive()
                            samples.append(time.perf_counter() - start)
                else:
                    for i in range(n + RTT_WARMUP):
                        start = time.perf_counter()
                        await stream.send(rtt_message(i))
                        await stream.receive()
                        samples.append(time.perf_counter() - start)
        return samples[RTT_WARMUP:]

    return trio.run(main)


def distributed_rtt(quick: bool, batched: bool = False, security: Any = None) -> list[float]:
    """``security``: a ``distributed.Security`` for dask's TLS (``benchmarks/tls.py``)."""
    from distributed.batched import BatchedSend
    from distributed.comm import connect as d_connect
    from distributed.comm import listen as d_listen

    logging.getLogger("distributed").setLevel(logging.ERROR)
    n = RTT_COUNT // (10 if quick else 1) // (4 if batched else 1)

    async def main() -> list[float]:
        async def echo(comm: Any) -> None:
            try:
                if batched:
                    b = BatchedSend(interval="2ms")
                    b.start(comm)
                    while True:
                        for msg in await comm.read():
                            b.send(msg)
                else:
                    while True:
                        await comm.write(await comm.read())
            except Exception:  # the client closed: the comm raises CommClosedError
                pass

        scheme = "tcp" if security is None else "tls"
        listen_kw = {} if security is None else security.get_listen_args("scheduler")
        connect_kw = {} if security is None else security.get_connection_args("client")
        listener = await d_listen(f"{scheme}://127.0.0.1:0", echo, **listen_kw)
        await listener.start()
        comm = await d_connect(listener.contact_address, **connect_kw)
        samples = []
        if batched:
            b = BatchedSend(interval="2ms")
            b.start(comm)
        for i in range(n + RTT_WARMUP):
            if batched:
                await asyncio.sleep(QUIET)
            start = time.perf_counter()
            if batched:
                b.send(rtt_message(i))
            else:
                await comm.write(rtt_message(i))
            await comm.read()
            samples.append(time.perf_counter() - start)
        if batched:
            await b.close()
        await comm.close()
        listener.stop()
        return samples[RTT_WARMUP:]

    return asyncio.run(main())


register(
    "wire-large",
    description="200 MB numpy arrays over one TCP connection on loopback (MB/s).",
    unit="MB/s",
    ours=over_tcp(ours_large),
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
    ours=over_tcp(ours_small),
    reference=lambda quick: distributed_small(quick, batched=False),
    reference_label="distributed.comm TCP write",
    target=2.0,
)
register(
    "wire-small-vs-batchedsend",
    description=(
        "~100-byte messages, both batched: ours (open_batched) against distributed's "
        "BatchedSend on distributed.comm TCP, 2 ms interval on both (messages/s); both "
        "receivers go through each batch as a list (ours: Stream.receive_batch)."
    ),
    unit="msg/s",
    ours=lambda quick: over_tcp(ours_small)(quick, lists=True),
    reference=distributed_small,
    reference_label="distributed BatchedSend",
    target=2.0,
)
register(
    "wire-small-vs-batchedsend-iter",
    description=(
        "As wire-small-vs-batchedsend, but our receiver takes one message at a time "
        "with `async for` (what the shells do); distributed's still gets lists."
    ),
    unit="msg/s",
    ours=over_tcp(ours_small),
    reference=distributed_small,
    reference_label="distributed BatchedSend",
    target=2.0,
)
register(
    "wire-small-unbatched",
    description="~100-byte messages, one awaited send each on both sides (messages/s).",
    unit="msg/s",
    ours=lambda quick: over_tcp(ours_small)(quick, batched=False),
    reference=lambda quick: distributed_small(quick, batched=False),
    reference_label="distributed.comm TCP write",
    target=2.0,
)
register(
    "wire-rtt-p50",
    description=(
        "Round trip of a tiny message over TCP loopback, median in microseconds: ours "
        "Stream.send/receive against distributed.comm write/read (echo peer)."
    ),
    unit="us",
    ours=lambda quick: _percentile(over_tcp(ours_rtt)(quick), 50),
    reference=lambda quick: _percentile(distributed_rtt(quick), 50),
    reference_label="distributed.comm TCP write/read",
    higher_is_better=False,
)
register(
    "wire-rtt-p99",
    description="The same round trips, 99th percentile in microseconds.",
    unit="us",
    ours=lambda quick: _percentile(over_tcp(ours_rtt)(quick), 99),
    reference=lambda quick: _percentile(distributed_rtt(quick), 99),
    reference_label="distributed.comm TCP write/read",
    higher_is_better=False,
)
register(
    "wire-rtt-batched-p50",
    description=(
        "Round trip of a tiny message with both ends sending through their batched "
        "senders (open_batched against distributed BatchedSend, 2 ms), median in "
        "microseconds."
    ),
    unit="us",
    ours=lambda quick: _percentile(over_tcp(ours_rtt)(quick, batched=True), 50),
    reference=lambda quick: _percentile(distributed_rtt(quick, batched=True), 50),
    reference_label="distributed BatchedSend",
    higher_is_better=False,
)
register(
    "wire-shortcut-rtt-p50",
    description=(
        "Round trip of a tiny message through the same-host shortcut (a Unix socket "
        "under the tcp:// address), median in microseconds, against ours over loopback TCP."
    ),
    unit="us",
    ours=lambda quick: _percentile(over_tcp(ours_rtt, shortcut=True)(quick), 50),
    reference=lambda quick: _percentile(over_tcp(ours_rtt)(quick), 50),
    reference_label="ours, loopback TCP",
    higher_is_better=False,
)
register(
    "wire-shortcut-large",
    description="200 MB numpy arrays through the same-host shortcut against ours over loopback TCP (MB/s).",
    unit="MB/s",
    ours=over_tcp(ours_large, shortcut=True),
    reference=over_tcp(ours_large),
    reference_label="ours, loopback TCP",
)
