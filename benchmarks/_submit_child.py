"""One sample of ``submit-large`` (``benchmarks.submit_large``), in a fresh process.

``python -m benchmarks._submit_child trio|dask|trio-inband [--quick] [--scatter]``: a
one-worker process cluster; after a warm-up, the seconds of ``submit(nbytes_of, a,
pure=False).result()`` with ``a`` a 500 MB numpy array made on the client (median of 3);
with ``--scatter``, of ``c.submit(nbytes_of, c.scatter(a)).result()`` (a new array each
time, so no sample finds the previous one's key); with ``--bytes``, of
``c.submit(len, c.scatter(b)).result()``, ``b`` 200 MB of ``bytes`` (new each time).
``trio-inband`` is ours with out-of-band run specs switched off (the previous path).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

MB = 1 << 20


def main() -> None:
    system = sys.argv[1]
    quick = "--quick" in sys.argv
    import numpy as np

    from benchmarks._cluster_tasks import nbytes_of

    if system == "dask":
        from distributed import Client, LocalCluster
    else:
        from trioscheduler.client.client import Client  # type: ignore[assignment]
        from trioscheduler.deploy.cluster import LocalCluster  # type: ignore[assignment]
        from trioscheduler.wire import runspec

        if system == "trio-inband":
            runspec.OUT_OF_BAND_BYTES = 1 << 62  # type: ignore[misc]
    as_bytes = "--bytes" in sys.argv
    n = (20 if quick else 200 if as_bytes else 500) * MB
    a = np.random.default_rng(0).integers(0, 255, n, dtype=np.uint8)
    times = []
    kw = {"dashboard_address": None} if system == "dask" else {}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, **kw) as cluster:
        with Client(cluster) as c:
            c.submit(nbytes_of, a[:10], pure=False).result()
            for i in range(3):
                if as_bytes:
                    a[0] = i  # a new value: a new key
                    value = a.tobytes()
                    start = time.perf_counter()
                    f = c.scatter(value)
                    assert c.submit(len, f, pure=False).result() == n
                    times.append(time.perf_counter() - start)
                    del f, value
                elif "--scatter" in sys.argv:
                    a[0] = i  # a new value: a new key
                    start = time.perf_counter()
                    f = c.scatter(a)
                    assert c.submit(nbytes_of, f, pure=False).result() == n
                    times.append(time.perf_counter() - start)
                    del f
                else:
                    start = time.perf_counter()
                    assert c.submit(nbytes_of, a, pure=False).result() == n
                    times.append(time.perf_counter() - start)
                time.sleep(0.2)
    print(json.dumps({"seconds": statistics.median(times), "samples": times}))


if __name__ == "__main__":
    main()
