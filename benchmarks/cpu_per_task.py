"""CPU time per task beside the wall figure, for builds alternated under a noisy load.

``python -m benchmarks.cpu_per_task lat|map N``: one sample in this process, a
``LocalCluster(2, 1, processes=True)``; after a warm-up either ``N`` calls of
``submit(inc, i, pure=False).result()`` (``lat``: their p50) or one ``map(inc,
range(N))`` + ``gather`` (``map``: tasks/s), and the CPU seconds (user + system, psutil)
the client process and the worker processes spent meanwhile, per task. Prints one JSON
line.

``python -m benchmarks.cpu_per_task --ab ROUNDS N lat|map NAME=PYTHONPATH ...``: runs
a sample per build in a fresh process, the order alternating each round, and prints the
medians. Each ``PYTHONPATH`` puts a build's ``trioscheduler`` first (``-`` for the
one installed). On a shared machine the CPU per task moves far less with the load than
the wall figures do, so it is what tells two builds apart.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

from benchmarks._cluster_tasks import inc
from benchmarks._harness import alternate_builds


def _cpu(proc: Any) -> dict[str, float]:
    import psutil

    out: dict[str, float] = {}
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        out[str(p.pid)] = t.user + t.system
    return out


def sample(mode: str, n: int) -> dict[str, Any]:
    import psutil

    import trioscheduler

    me = psutil.Process()
    kw = {"n_workers": 2, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    with trioscheduler.LocalCluster(**kw) as cluster, trioscheduler.Client(cluster) as client:
        for i in range(50):
            client.submit(inc, i, pure=False).result()
        client.gather(client.map(inc, range(-1_000, 0)))
        time.sleep(0.2)
        before, start = _cpu(me), time.perf_counter()
        if mode == "lat":
            lat = []
            for i in range(n):
                t = time.perf_counter()
                client.submit(inc, i, pure=False).result()
                lat.append(time.perf_counter() - t)
            result: dict[str, Any] = {"p50_ms": statistics.median(lat) * 1e3}
        else:
            futures = client.map(inc, range(n))
            client.gather(futures)
            result = {"tasks_per_s": n / (time.perf_counter() - start)}
            del futures
        wall = time.perf_counter() - start
        after = _cpu(me)
    own = str(me.pid)
    client_s = after[own] - before[own]
    workers_s = sum(after[p] - before[p] for p in after if p != own and p in before)
    result.update(
        client_us_per_task=client_s * 1e6 / n, workers_us_per_task=workers_s * 1e6 / n,
        wall_s=wall, load=os.getloadavg()[0],
    )  # fmt: skip
    return result


def ab(rounds: int, n: int, mode: str, builds: list[tuple[str, str]]) -> None:
    key = "p50_ms" if mode == "lat" else "tasks_per_s"
    alternate_builds("benchmarks.cpu_per_task", [mode, str(n)], builds, rounds, key)


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--ab":
        rounds, n, mode = int(argv[1]), int(argv[2]), argv[3]
        ab(rounds, n, mode, [tuple(a.split("=", 1)) for a in argv[4:]])  # type: ignore[misc]
        return
    print(json.dumps(sample(argv[0], int(argv[1]))), flush=True)
    os._exit(0)  # don't wait on lingering non-daemon threads


if __name__ == "__main__":
    main(sys.argv[1:])
