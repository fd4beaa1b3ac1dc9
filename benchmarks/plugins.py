"""What watching transitions costs: a map with no-op ``transition`` plugins registered.

Each sample is a subprocess (``python -m benchmarks.plugins CHILD system``) with a
cluster of two single-threaded worker processes; it registers a scheduler plugin and a
worker plugin whose ``transition`` hooks only count, then times
``client.gather(client.map(inc, range(N), pure=False))`` (tasks/s), best of two. The
reference is dask.distributed with the same two plugins (subclassing its classes).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._harness import child_result, register

ROOT = Path(__file__).resolve().parent.parent


def inc(x: int) -> int:
    return x + 1


def _plugins(system: str) -> tuple[Any, Any]:
    if system == "dask":
        from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin
    else:
        from trioscheduler.plugins import SchedulerPlugin, WorkerPlugin  # type: ignore[assignment]

    class CountScheduler(SchedulerPlugin):  # type: ignore[misc,valid-type]
        name = "count-scheduler"
        n = 0

        def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
            self.n += 1

    class CountWorker(WorkerPlugin):  # type: ignore[misc,valid-type]
        name = "count-worker"
        n = 0

        def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
            self.n += 1

    return CountScheduler(), CountWorker()


def _child(system: str, n: int) -> float:
    if system == "dask":
        from distributed import Client, LocalCluster

        cluster: Any = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None)
    else:
        from trioscheduler import Client  # type: ignore[assignment]
        from trioscheduler import LocalCluster as OurCluster

        cluster = OurCluster(2, 1, memory_limit=0)
    with cluster, Client(cluster) as client:
        for plugin in _plugins(system):
            client.register_plugin(plugin)
        best = 0.0
        for _ in range(2):
            t0 = time.perf_counter()
            client.gather(client.map(inc, range(n), pure=False))
            best = max(best, n / (time.perf_counter() - t0))
        return best


def _sample(system: str, quick: bool) -> float:
    n = 1000 if quick else 10_000
    return float(child_result("benchmarks.plugins", "CHILD", system, str(n))["tasks_per_s"])


register(
    "plugins-transition-map",
    description="10,000-task map with no-op scheduler and worker 'transition' plugins "
    "registered, two worker processes (tasks/s, best of two).",
    unit="tasks/s",
    ours=lambda quick: _sample("trio", quick),
    reference=lambda quick: _sample("dask", quick),
    reference_label="distributed 2026.8.0",
)


if __name__ == "__main__" and len(sys.argv) >= 4 and sys.argv[1] == "CHILD":
    print(json.dumps({"tasks_per_s": _child(sys.argv[2], int(sys.argv[3]))}))
