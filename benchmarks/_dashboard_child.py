"""One side of the dashboard benchmark: a local cluster with its dashboard, until stdin ends.

``python -m benchmarks._dashboard_child trio|dask`` starts ``LocalCluster(n_workers=2,
threads_per_worker=1, processes=True)`` with the dashboard on a free port of 127.0.0.1,
runs a few tasks (so the pages have something to show), prints
``{"link": ..., "pid": ...}`` and idles until its stdin closes. The scheduler (and the
client) live in this process, whose CPU the parent measures.
"""

from __future__ import annotations

import json
import logging
import os
import sys


def inc(x: int) -> int:
    return x + 1


def main(system: str) -> None:
    if system == "trio":
        from trioscheduler import Client, LocalCluster
    else:
        from distributed import Client, LocalCluster

        logging.getLogger("distributed").setLevel(logging.ERROR)
    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0"
    )
    client = Client(cluster)
    try:
        futures = client.map(inc, range(200))
        assert client.submit(sum, futures).result() == sum(range(1, 201))
        print(json.dumps({"link": cluster.dashboard_link, "pid": os.getpid()}), flush=True)
        sys.stdin.read()
    finally:
        client.close()
        cluster.close()


if __name__ == "__main__":
    main(sys.argv[1])
