"""The asynchronous Client's round trip, under asyncio and under trio, against dask's.

Each sample starts a cluster of two single-threaded worker processes in a subprocess
(``python -m benchmarks.client_async CHILD system loop``), opens an asynchronous client
from an ``asyncio.run`` (or ``trio.run``) program, and times 500
``await client.submit(inc, i, pure=False)`` in a row after 20 warm-up calls: the p50 in
ms. Ours under asyncio goes through the bridge (``client/bridge.py``: the session runs
in the background trio loop); under trio it runs in the program's own loop. The
reference is dask's asynchronous Client under asyncio, the way dask users run it.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._harness import child_result, register

ROOT = Path(__file__).resolve().parent.parent
CALLS, WARM_UP = 500, 20


def inc(x: int) -> int:
    return x + 1


async def _latency(client: Any, n: int) -> float:
    samples = []
    for i in range(WARM_UP + n):
        t0 = time.perf_counter()
        await client.submit(inc, i, pure=False)
        if i >= WARM_UP:
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1000


def _child(system: str, loop: str, n: int) -> float:
    if system == "dask":
        import asyncio

        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster:

            async def main_dask() -> float:
                async with Client(cluster.scheduler_address, asynchronous=True) as c:
                    return await _latency(c, n)

            return asyncio.run(main_dask())
    from trioscheduler import Client as OurClient
    from trioscheduler import LocalCluster as OurCluster

    with OurCluster(2, 1, memory_limit=0) as ours:

        async def main_ours() -> float:
            async with OurClient(ours.scheduler_address, asynchronous=True) as c:
                return await _latency(c, n)

        if loop == "trio":
            import trio

            return trio.run(main_ours)
        import asyncio

        return asyncio.run(main_ours())


def _sample(system: str, loop: str, quick: bool) -> float:
    n = 100 if quick else CALLS
    return float(child_result("benchmarks.client_async", "CHILD", system, loop, str(n), timeout=300)["p50_ms"])


register(
    "client-async-latency-asyncio",
    description="p50 of 'await client.submit(inc, i, pure=False)' from an asyncio program, 500 in a row "
    "(ms): ours through the bridge against dask's asynchronous Client.",
    unit="ms", higher_is_better=False,
    ours=lambda quick: _sample("trio", "asyncio", quick),
    reference=lambda quick: _sample("dask", "asyncio", quick),
    reference_label="distributed (asyncio)",
)  # fmt: skip
register(
    "client-async-latency-trio",
    description="The same from a trio program (ours in its own loop) against dask's asynchronous Client "
    "under asyncio (ms).",
    unit="ms", higher_is_better=False,
    ours=lambda quick: _sample("trio", "trio", quick),
    reference=lambda quick: _sample("dask", "asyncio", quick),
    reference_label="distributed (asyncio)",
)  # fmt: skip


if __name__ == "__main__" and len(sys.argv) >= 5 and sys.argv[1] == "CHILD":
    print(json.dumps({"p50_ms": _child(sys.argv[2], sys.argv[3], int(sys.argv[4]))}))
