"""One sample of the same-host transfer rows (``benchmarks.shm``), in a fresh process.

``python -m benchmarks._shm_child on|lazy|off|dask [--quick]`` starts a
``LocalCluster(3, 1, processes=True)`` of workers A, B, C:

* ``on``: trioscheduler as it comes (shared memory, results placed in it as they return
  once a worker has a same-host peer: ``distributed.worker.shared-memory.place-results``);
* ``lazy``: shared memory, results never placed (copied into a segment at their first
  same-host fetch: the behaviour before session 7);
* ``off``: ``TRIOSCHEDULER_SHARED_MEMORY=0`` and ``TRIOSCHEDULER_UNIX_SOCKETS=0``, loopback TCP;
* ``dask``: dask.distributed's ``LocalCluster`` (TCP).

A warm-up first: a 20 MB array made on A is read on B and C (the workers have met, as
in any cluster that has run a little). Then three rounds, each printing (medians, JSON):

* ``produce``: seconds from ``submit(make_array(200 MB), workers=[A])`` to ``wait``
  (the task, and the placing of its result if any);
* ``first``/``later``: MB/s of the array's transfer to B, then to C (a remote consumer's
  round trip minus a local one's; ``nbytes_of`` reads nothing);
* ``e2e``: seconds from submitting a new array on A and ``touch`` of it on B (reads every
  page) to the result: the whole cost of producing on one worker and consuming on another.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

MB = 1 << 20


def main() -> None:
    mode = sys.argv[1]
    quick = "--quick" in sys.argv
    os.environ["TRIOSCHEDULER_SHARED_MEMORY"] = "0" if mode == "off" else "1"
    if mode == "off":  # loopback TCP itself, not the same-host shortcut's Unix socket
        os.environ["TRIOSCHEDULER_UNIX_SOCKETS"] = "0"
    if mode == "lazy":
        os.environ["DASK_DISTRIBUTED__WORKER__SHARED_MEMORY__PLACE_RESULTS"] = "never"
    from benchmarks._cluster_tasks import make_array, nbytes_of, touch

    if mode == "dask":
        from distributed import Client, LocalCluster, wait

        kwargs: dict[str, Any] = {"dashboard_address": ":0"}
    else:
        from trioscheduler.client.client import Client  # type: ignore[assignment]
        from trioscheduler.client.futures import wait  # type: ignore[assignment]
        from trioscheduler.deploy.cluster import LocalCluster  # type: ignore[assignment]

        kwargs = {}
    nbytes = (20 if quick else 200) * MB
    out: dict[str, list[float]] = {"produce": [], "first": [], "later": [], "e2e": []}
    with LocalCluster(
        n_workers=3, threads_per_worker=1, processes=True, memory_limit=0, **kwargs
    ) as cluster, Client(cluster) as c:
        c.wait_for_workers(3)
        a, b, d = sorted(c.scheduler_info()["workers"])

        def timed(x: object, worker: str) -> float:
            start = time.perf_counter()
            assert c.submit(nbytes_of, x, workers=[worker], pure=False).result() == nbytes
            return time.perf_counter() - start

        warm = c.submit(make_array, 20 * MB, 99, pure=False, workers=[a])
        for w in (b, d):
            c.submit(touch, warm, workers=[w], pure=False).result()
        del warm
        for r in range(3):
            start = time.perf_counter()
            x = c.submit(make_array, nbytes, r, pure=False, workers=[a])
            wait([x])
            out["produce"].append(time.perf_counter() - start)
            timed(x, a)
            local = timed(x, a)
            out["first"].append(nbytes / max(timed(x, b) - local, 1e-6) / MB)
            out["later"].append(nbytes / max(timed(x, d) - local, 1e-6) / MB)
            del x
            time.sleep(0.3)
            start = time.perf_counter()
            y = c.submit(make_array, nbytes, 100 + r, pure=False, workers=[a])
            c.submit(touch, y, workers=[b], pure=False).result()
            out["e2e"].append(time.perf_counter() - start)
            del y
            time.sleep(0.3)
    result: dict[str, Any] = {k: statistics.median(v) for k, v in out.items()}
    result["samples"] = out
    print(json.dumps(result))


if __name__ == "__main__":
    main()
