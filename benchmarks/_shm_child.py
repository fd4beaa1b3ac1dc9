"""One sample of the same-host transfer rows (``benchmarks.shm``), in a fresh process.

``python -m benchmarks._shm_child on|off [--quick]`` starts ``LocalCluster(3, 1,
processes=True)`` with shared memory on or off (``TRIOSCHEDULER_SHARED_MEMORY``), makes
a 200 MB array on worker A three times and prints, as JSON, the MB/s of its first
transfer (to B: copied into shared memory, or sent through the socket) and of a later
one (to C: already in shared memory, or the socket again); each transfer is a remote
consumer's round trip minus a local consumer's, medians of the three.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

MB = 1 << 20


def main() -> None:
    mode = sys.argv[1]
    quick = "--quick" in sys.argv
    os.environ["TRIOSCHEDULER_SHARED_MEMORY"] = "1" if mode == "on" else "0"
    from benchmarks._cluster_tasks import make_array, nbytes_of
    from trioscheduler.client.client import Client
    from trioscheduler.deploy.cluster import LocalCluster

    nbytes = (20 if quick else 200) * MB
    first, later = [], []
    with LocalCluster(3, 1, processes=True, memory_limit=0) as cluster, Client(cluster) as c:
        a, b, d = sorted(c.scheduler_info()["workers"])

        def timed(x: object, worker: str) -> float:
            start = time.perf_counter()
            assert c.submit(nbytes_of, x, workers=[worker], pure=False).result() == nbytes
            return time.perf_counter() - start

        for r in range(3):
            x = c.submit(make_array, nbytes, r, pure=False, workers=[a])
            timed(x, a)  # x is in memory on A
            local = timed(x, a)
            first.append(nbytes / max(timed(x, b) - local, 1e-6) / MB)
            later.append(nbytes / max(timed(x, d) - local, 1e-6) / MB)
            del x
            time.sleep(0.3)
    print(json.dumps({"first_mb_per_s": statistics.median(first), "first": first,
                      "later_mb_per_s": statistics.median(later), "later": later}))  # fmt: skip


if __name__ == "__main__":
    main()
