"""IPython kernels in workers (issue 16).

dask.distributed has had no kernels in its servers since 2022.04 (PR #6036), so there is
no like-for-like reference. Two rows compare with what a user does instead:

* ``kernels-start``: from ``start_ipython_workers()`` to a connected, ready
  ``BlockingKernelClient`` on a fresh worker process (its first kernel: imports
  included), against starting a standalone ipykernel process with ``jupyter_client``'s
  ``KernelManager`` and waiting until it is ready (a kernel, but without the worker).
* ``kernels-inspect``: reading a worker's state, ``len(worker.store)`` as a kernel cell
  (what ``%remote`` sends), against dask's remaining way, ``Client.run(lambda
  dask_worker: len(dask_worker.data))`` (calls per second).
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks._harness import register


def _ours_cluster() -> Any:
    from trioscheduler import Client, LocalCluster

    # spawn: a fresh interpreter per worker, so the kernel pays its imports
    cluster = LocalCluster(1, 1, memory_limit=0, start_method="spawn")
    return cluster, Client(cluster)


def _ready_client(info: dict[str, Any]) -> Any:
    from jupyter_client.blocking.client import BlockingKernelClient

    kc = BlockingKernelClient()
    kc.load_connection_info(info)
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    return kc


def ours_start(quick: bool) -> float:
    cluster, client = _ours_cluster()
    try:
        t0 = time.perf_counter()
        [info] = client.start_ipython_workers().values()
        kc = _ready_client(info)
        elapsed = time.perf_counter() - t0
        kc.stop_channels()
        return elapsed
    finally:
        client.close()
        cluster.close()


def standalone_start(quick: bool) -> float:
    from jupyter_client.manager import KernelManager

    t0 = time.perf_counter()
    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    elapsed = time.perf_counter() - t0
    kc.stop_channels()
    km.shutdown_kernel(now=True)
    return elapsed


def _calls(quick: bool) -> int:
    return 20 if quick else 200


def ours_inspect(quick: bool) -> float:
    cluster, client = _ours_cluster()
    try:
        client.submit(sum, [1, 2]).result()
        [info] = client.start_ipython_workers().values()
        kc = _ready_client(info)
        n = _calls(quick)
        t0 = time.perf_counter()
        for _ in range(n):
            reply = kc.execute_interactive(
                "len(worker.store)", timeout=60, output_hook=lambda m: None
            )
            assert reply["content"]["status"] == "ok"
        rate = n / (time.perf_counter() - t0)
        kc.stop_channels()
        return rate
    finally:
        client.close()
        cluster.close()


def _dask_len(dask_worker: Any) -> int:
    return len(dask_worker.data)


def dask_inspect(quick: bool) -> float:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        client.submit(sum, [1, 2]).result()
        n = _calls(quick)
        t0 = time.perf_counter()
        for _ in range(n):
            client.run(_dask_len)
        return n / (time.perf_counter() - t0)


register(
    "kernels-start",
    description=(
        "first IPython kernel in a fresh worker process, start_ipython_workers() to a "
        "ready BlockingKernelClient (s); reference: a standalone ipykernel process "
        "(KernelManager), since dask has no kernels in its servers"
    ),
    unit="s",
    ours=ours_start,
    reference=standalone_start,
    reference_label="standalone ipykernel (KernelManager)",
    higher_is_better=False,
)
register(
    "kernels-inspect",
    description=(
        "read a worker's state: a kernel cell len(worker.store) (what %remote sends) "
        "against dask's Client.run(lambda dask_worker: len(dask_worker.data)) (calls/s)"
    ),
    unit="calls/s",
    ours=ours_inspect,
    reference=dask_inspect,
    reference_label="dask Client.run",
)
