"""Where a ``submit(...).result()`` round trip spends its steps and CPU, per thread.

``python -m benchmarks.round_trip_steps N``: a ``LocalCluster(2, 1, processes=True)``
(the scheduler in this process), a warm-up, then ``N`` calls of
``submit(inc, i, pure=False).result()`` while a trio ``Instrument`` counts the task
steps and I/O waits of the client process's loop and of each worker's loop; prints one
JSON line: p50, and per round trip the CPU (``time.thread_time``) of the user thread,
the client process's loop thread, the busier worker's loop thread and its task thread,
and the steps per loop (by task name). Step counts hardly move with the machine's load,
so they tell two builds apart where wall times cannot.

``python -m benchmarks.round_trip_steps --ab ROUNDS N NAME=PYTHONPATH ...``: a sample
per build in a fresh process, the order alternating each round; prints the medians.
(Session 7 of issue 20 measured with this, as ``/tmp/lat2/prof.py``.)
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from typing import Any

import trio

from benchmarks._cluster_tasks import inc
from benchmarks._harness import step_tool

_STATE: dict[str, Any] = {}  # per process: the counter and the CPU clocks at the start


class _Count(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps = 0
        self.io_waits = 0
        self.by_task: dict[str, int] = {}

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1
        name = task.name.rsplit(".", 1)[-1]
        self.by_task[name] = self.by_task.get(name, 0) + 1

    def before_io_wait(self, timeout: float) -> None:
        self.io_waits += 1


def start_loop() -> None:
    """(In a loop: ``run_on_scheduler`` / ``client.run``.) Start counting."""
    count = _Count()
    trio.lowlevel.add_instrument(count)
    _STATE["count"], _STATE["loop_cpu"] = count, time.thread_time()


def stop_loop(n: int) -> dict[str, Any]:
    cpu = time.thread_time() - _STATE["loop_cpu"]
    count: _Count = _STATE.pop("count")
    trio.lowlevel.remove_instrument(count)
    top = sorted(count.by_task.items(), key=lambda kv: -kv[1])[:8]
    return {
        "loop_cpu_us": cpu * 1e6 / n, "steps": count.steps / n, "io_waits": count.io_waits / n,
        "by_task": {k: round(v / n, 2) for k, v in top},
    }  # fmt: skip


def task_clock(stop: bool = False) -> float:
    """(A task: it runs in the worker's only task thread.) Start, or read, its CPU clock."""
    if not stop:
        _STATE["task_cpu"] = time.thread_time()
        _STATE["task_thread"] = threading.get_ident()
        return 0.0
    return time.thread_time() - _STATE["task_cpu"]


def sample(n: int) -> dict[str, Any]:
    import trioscheduler

    kw = {"n_workers": 2, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    with trioscheduler.LocalCluster(**kw) as cluster, trioscheduler.Client(cluster) as client:
        for i in range(200):
            client.submit(inc, i, pure=False).result()
        workers = list(client.scheduler_info()["workers"])
        for w in workers:
            client.submit(task_clock, pure=False, workers=[w]).result()
        client.run(start_loop)
        client.run_on_scheduler(start_loop)
        user = time.thread_time()
        lat = []
        for i in range(n):
            t = time.perf_counter()
            client.submit(inc, i, pure=False).result()
            lat.append(time.perf_counter() - t)
        user = time.thread_time() - user
        own = client.run_on_scheduler(stop_loop, n)
        loops = client.run(stop_loop, n)
        tasks = {
            w: client.submit(task_clock, True, pure=False, workers=[w]).result() for w in workers
        }
    busy = max(loops, key=lambda w: loops[w]["loop_cpu_us"])
    return {
        "p50_ms": statistics.median(lat) * 1e3,
        "user_us": user * 1e6 / n,
        "client_loop_us": own["loop_cpu_us"],
        "client_steps": own["steps"],
        "worker_loop_us": loops[busy]["loop_cpu_us"],
        "worker_steps": loops[busy]["steps"],
        "task_thread_us": tasks[busy] * 1e6 / n,
        "client_by_task": own["by_task"],
        "worker_by_task": loops[busy]["by_task"],
        "load": os.getloadavg()[0],
    }


def main(argv: list[str]) -> None:
    step_tool("benchmarks.round_trip_steps", sample, "p50_ms", argv)


if __name__ == "__main__":
    # by its module name, so that the functions sent to the loops are pickled by
    # reference and share that module's _STATE in each process
    from benchmarks import round_trip_steps

    round_trip_steps.main(sys.argv[1:])
