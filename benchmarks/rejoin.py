"""How long a worker takes to rejoin its scheduler after its stream dropped (issue 18).

``python -m benchmarks.rejoin``: one process, TCP on 127.0.0.1; the stream is closed
under the worker ``ROUNDS`` times, ``PAUSE`` seconds apart (each drop a new outage), and
the time until the scheduler lists the worker again is reported. dask has no
counterpart (its workers close when the stream breaks), so there is no ratio.
"""

from __future__ import annotations

import statistics
import time

import trio

from trioscheduler.server.scheduler import Scheduler
from trioscheduler.server.worker import Worker

ROUNDS = 8
PAUSE = 2.5  # over two heartbeats: each drop starts a new outage


async def main() -> None:
    times: list[float] = []
    async with Scheduler("tcp://127.0.0.1:0") as s, Worker(s.address, memory_limit=0) as w:
        for _ in range(ROUNDS):
            await trio.sleep(PAUSE)
            n = w.reconnections
            assert w._stream is not None
            t0 = time.perf_counter()
            await w._stream.aclose()
            while not (w.reconnections > n and w.address in s.state.workers):  # noqa: ASYNC110
                await trio.sleep(0.001)
            times.append(time.perf_counter() - t0)
    print(
        f"drop -> rejoined: median {statistics.median(times) * 1000:.1f} ms, "
        f"max {max(times) * 1000:.1f} ms over {len(times)}"
    )


if __name__ == "__main__":
    trio.run(main)
