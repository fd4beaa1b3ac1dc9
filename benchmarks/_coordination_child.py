"""One repetition of one coordination workload on one system, in a fresh process.

``python -m benchmarks._coordination_child WORKLOAD SYSTEM [--quick]`` prints one JSON line.
``SYSTEM`` is ``trio`` or ``dask`` (``benchmarks._cluster_child.System``: a
``LocalCluster(processes=True)`` with the dashboard off, the client in this process).

* ``lock``: one client, uncontended ``Lock.acquire()`` + ``release()`` round trips
  (1 worker; p50 and mean in µs over 500, after 20 unmeasured);
* ``semaphore``: 4 tasks on 2 workers x 2 threads, each 100 acquire+release cycles of
  one ``Semaphore(max_leases=2)``; cycles per second from the first task's start to the
  last one's end (wall clock of the worker processes);
* ``actor``: ``counter.increment().result()`` from the client to an actor on 1 worker
  (p50 and mean in µs over 500, after 20 unmeasured). ``SYSTEM`` may also be ``ray``
  (Ray's actors, ``ray.get(counter.increment.remote())`` on a local Ray instance of
  2 CPUs, when ray is installed).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

from benchmarks._cluster_child import System
from benchmarks._coordination_tasks import Counter, api, semaphore_cycles

WORKLOADS = ("lock", "semaphore", "actor")


def _latencies(call: Any, n: int, warm: int = 20) -> dict[str, float]:
    for _ in range(warm):
        call()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return {
        "p50_us": statistics.median(samples) * 1e6,
        "mean_us": statistics.fmean(samples) * 1e6,
        "n": n,
    }


def lock(system: System, quick: bool) -> dict[str, Any]:
    with system.session(1) as client:
        lk = api(system.name).Lock("bench-lock")

        def once() -> None:
            lk.acquire()
            lk.release()

        client.wait_for_workers(1)
        return _latencies(once, 50 if quick else 500)


def semaphore(system: System, quick: bool) -> dict[str, Any]:
    cycles = 20 if quick else 100
    with system.session(2, threads_per_worker=2) as client:
        client.wait_for_workers(2)
        # a first round warms both systems' worker clients and connections
        client.gather(client.map(semaphore_cycles, range(4), system=system.name,
                                 name="warm", max_leases=2, cycles=2, pure=False))  # fmt: skip
        futures = client.map(
            semaphore_cycles, range(4), system=system.name, name="bench-sem",
            max_leases=2, cycles=cycles, pure=False,
        )  # fmt: skip
        spans = client.gather(futures)
    elapsed = max(end for _, end in spans) - min(start for start, _ in spans)
    return {"cycles_per_s": 4 * cycles / elapsed, "elapsed_s": elapsed, "tasks": 4}


def ray_actor(quick: bool) -> dict[str, Any]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        counter = ray.remote(Counter).remote()
        metrics = _latencies(lambda: ray.get(counter.increment.remote()), 50 if quick else 500)
        return {"system": "ray", "version": ray.__version__, **metrics}
    finally:
        ray.shutdown()


def actor(system: System, quick: bool) -> dict[str, Any]:
    with system.session(1) as client:
        counter = client.submit(Counter, actor=True).result()
        return _latencies(lambda: counter.increment().result(), 50 if quick else 500)


def main() -> None:
    workload, name = sys.argv[1], sys.argv[2]
    quick = "--quick" in sys.argv[3:]
    if name == "ray":
        print(json.dumps(ray_actor(quick)))
        return
    system = System(name)
    metrics = {"lock": lock, "semaphore": semaphore, "actor": actor}[workload](system, quick)
    print(json.dumps({**system.info, **metrics}))


if __name__ == "__main__":
    main()
