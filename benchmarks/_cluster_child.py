"""One repetition of one cluster workload on one system, in a fresh process.

``python -m benchmarks._cluster_child WORKLOAD SYSTEM [--quick]`` prints one JSON line of
metrics. ``SYSTEM`` is ``trio`` (trioscheduler), ``dask`` (dask.distributed defaults) or
``dask-inf`` (dask.distributed with ``distributed.scheduler.worker-saturation = inf``, set
with ``dask.config.set`` before the cluster exists; the scheduler reads it in this very
process, and the value it read is reported as ``worker_saturation``).

Both systems run ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``
(``scale<W>``: ``W`` workers, benchmarks/scaling.py) with the dashboard off: the scheduler and the client live in this process, the workers in
child processes. So the peak RSS of this process during a workload, minus its RSS just
before, is the memory the scheduler (and the client's futures) needed for it.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psutil

from benchmarks._cluster_tasks import add, first, inc, make_array, nbytes_of, peak_rss, total

SYSTEMS = ("trio", "trio-log", "dask", "dask-inf")
MB = 1_000_000


class System:
    """The two APIs behind one face: ``cluster(**kw)``, ``client(cluster)``, ``info``."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name in ("trio", "trio-log"):
            import trioscheduler

            self.LocalCluster = trioscheduler.LocalCluster
            self.Client = trioscheduler.Client
            self.wait = trioscheduler.wait
            self.version = getattr(trioscheduler, "__version__", "dev")
        else:
            import dask
            import distributed

            logging.getLogger("distributed").setLevel(logging.ERROR)
            if name == "dask-inf":
                dask.config.set({"distributed.scheduler.worker-saturation": float("inf")})
            self.LocalCluster = distributed.LocalCluster
            self.Client = distributed.Client
            self.wait = distributed.wait
            self.version = distributed.__version__
        self.info: dict[str, Any] = {"system": name, "version": self.version}

    def cluster(self, n_workers: int = 2, **kw: Any) -> Any:
        kw.setdefault("threads_per_worker", 1)
        if self.name == "trio-log":  # the scheduler keeps its recovery log (issue 18)
            import tempfile

            log = os.path.join(tempfile.mkdtemp(prefix="bench-recover-"), "scheduler.log")
            kw["scheduler_kwargs"] = {"recover_from": log}
            self.info["log"] = log
        cluster = self.LocalCluster(
            n_workers=n_workers, processes=True, dashboard_address=None, **kw
        )
        if not self.name.startswith("trio"):
            # what the running scheduler actually uses (proves the config took effect)
            self.info["worker_saturation"] = cluster.scheduler.WORKER_SATURATION
        return cluster

    @contextmanager
    def session(self, n_workers: int = 2, **kw: Any) -> Iterator[Any]:
        cluster = self.cluster(n_workers, **kw)
        try:
            client = self.Client(cluster)
            try:
                yield client
            finally:
                client.close()
        finally:
            cluster.close()


def workers_of(client: Any) -> list[str]:
    return sorted(client.scheduler_info()["workers"])


class PeakRSS:
    """Peak RSS of this process over a block, by sampling plus ``ru_maxrss``."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.proc = psutil.Process()
        self.peak = 0
        self.before = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self.before = self.proc.memory_info().rss
        self.peak = self.before
        self._maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if maxrss > self._maxrss_before:  # the kernel's exact peak was reached in the block
            self.peak = max(self.peak, maxrss)

    @property
    def delta(self) -> int:
        return self.peak - self.before


# ------------------------------------------------------------------------------ workloads


def w_startup(s: System, quick: bool) -> dict[str, Any]:
    start = time.perf_counter()
    with s.session() as client:
        assert client.submit(inc, 1).result() == 2
    return {"seconds": time.perf_counter() - start}


def w_map(s: System, quick: bool) -> dict[str, Any]:
    n = 2_000 if quick else 20_000
    with s.session() as client:
        warm = client.map(inc, range(-1_000, 0))
        client.gather(warm)
        del warm
        time.sleep(0.2)
        with PeakRSS() as rss:
            start, cpu = time.perf_counter(), time.process_time()
            futures = client.map(inc, range(n))
            results = client.gather(futures)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        assert results[-1] == n
        del futures, results
    return {"tasks_per_s": n / elapsed, "seconds": elapsed, "tasks": n,
            "rss_delta": rss.delta, "bytes_per_task": rss.delta / n,
            "tasks_per_cpu_s": n / cpu}  # fmt: skip


def latency(client: Any, quick: bool) -> dict[str, Any]:
    n = 100 if quick else 500
    for i in range(20):
        client.submit(inc, i, pure=False).result()
    lat = []
    for i in range(n):
        start = time.perf_counter()
        client.submit(inc, i, pure=False).result()
        lat.append(time.perf_counter() - start)
    lat.sort()
    return {"p50_ms": statistics.median(lat) * 1e3,
            "p99_ms": lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))] * 1e3}  # fmt: skip


def w_tree(s: System, quick: bool) -> dict[str, Any]:
    from dask import delayed

    leaves = 1_024 if quick else 8_192
    with s.session() as client:
        client.gather(client.map(inc, range(-200, 0)))
        layer = [delayed(inc)(i) for i in range(leaves)]
        while len(layer) > 1:
            layer = [delayed(add)(layer[i], layer[i + 1]) for i in range(0, len(layer), 2)]
        root = layer[0]
        n = 2 * leaves - 1
        with PeakRSS() as rss:
            start, cpu = time.perf_counter(), time.process_time()
            value = client.compute(root).result()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        assert value == leaves * (leaves + 1) // 2, value
    return {"tasks_per_s": n / elapsed, "seconds": elapsed, "tasks": n,
            "rss_delta": rss.delta, "bytes_per_task": rss.delta / n,
            "tasks_per_cpu_s": n / cpu}  # fmt: skip


def array(s: System, client: Any, quick: bool) -> dict[str, Any]:
    import dask
    import dask.array as da

    side = 2_000 if quick else 8_000
    client.compute(da.ones((10, 10), chunks=5).sum()).result()  # imports on the workers
    x = da.random.random((side, side), chunks=(500, 500))
    expr = (x + x.T).mean()
    start = time.perf_counter()
    try:
        value = client.compute(expr).result()
        how = "client.compute"
    except Exception as exc:
        if not s.name.startswith("trio"):
            return {"array_error": f"{type(exc).__name__}: {exc}"[:300]}
        try:
            start = time.perf_counter()
            (value,) = dask.compute(expr, scheduler=client.get)
            how = "dask.compute(scheduler=client.get)"
        except Exception:
            return {"array_unsupported": f"{type(exc).__name__}: {exc}"[:300]}
    elapsed = time.perf_counter() - start
    assert 0.9 < value < 1.1, value
    return {"array_s": elapsed, "array_how": how, "array_tasks": len(expr.__dask_graph__())}


def transfer(client: Any, quick: bool) -> dict[str, Any]:
    nbytes = (20 if quick else 200) * MB
    rates, local, remote = [], [], []
    a, b = workers_of(client)[:2]
    client.submit(inc, 0, workers=[a], pure=False).result()
    client.submit(inc, 0, workers=[b], pure=False).result()
    for r in range(3):
        x = client.submit(make_array, nbytes, r, pure=False, workers=[a])
        client.submit(nbytes_of, x, workers=[a], pure=False).result()  # x is in memory on A
        start = time.perf_counter()
        assert client.submit(nbytes_of, x, workers=[a], pure=False).result() == nbytes
        t_local = time.perf_counter() - start
        start = time.perf_counter()
        assert client.submit(nbytes_of, x, workers=[b], pure=False).result() == nbytes
        t_remote = time.perf_counter() - start
        local.append(t_local)
        remote.append(t_remote)
        rates.append(nbytes / max(t_remote - t_local, 1e-9) / MB)
        del x
        time.sleep(0.3)
    return {"mb_per_s": statistics.median(rates), "rates": rates, "local_s": local,
            "remote_s": remote, "nbytes": nbytes}  # fmt: skip


def w_small(s: System, quick: bool) -> dict[str, Any]:
    """Workloads 3, 6 and 5 on one cluster: latency, transfer, then array."""
    with s.session() as client:
        metrics = latency(client, quick)
        metrics.update(transfer(client, quick))
        metrics.update(array(s, client, quick))
    return metrics


def w_spill(s: System, quick: bool, readback: bool = False) -> dict[str, Any]:
    """Workload 7; with ``readback`` (``spillback``) every array is made before any
    ``first`` runs, so the spilled ones (~24 of 30) are read back from disk."""
    count, size, limit = (8, 50 * MB, "400MiB") if quick else (30, 100 * MB, "1GiB")
    expected = float(sum(range(count)))
    finished, error, value = False, None, None
    with s.session(n_workers=1, memory_limit=limit) as client:
        before = workers_of(client)
        start = time.perf_counter()
        try:
            arrays = [
                client.submit(make_array, size, i, float(i), pure=False) for i in range(count)
            ]
            if readback:
                s.wait(arrays)  # all made (and most spilled) before any is read
            firsts = client.map(first, arrays, pure=False)
            value = client.submit(total, *firsts, pure=False).result()
            finished = value == expected
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
        elapsed = time.perf_counter() - start
        after = workers_of(client)
        try:  # the worker's peak RSS over its life (the workload is most of it)
            worker_rss = max(client.run(peak_rss).values()) / MB
        except Exception:
            worker_rss = float("nan")
    completed = float(finished and before == after)
    return {"seconds": elapsed, "completed": completed, "finished": finished, "value": value, "expected": expected,
            "worker_restarted": before != after, "error": error, "worker_peak_rss_mb": worker_rss}  # fmt: skip


def w_api(s: System, quick: bool) -> dict[str, Any]:
    """Issue 13's Client API: an executor call's round trip (``get_executor().submit(...)
    .result()``), an event's (``log_event`` then ``get_events``), and ``profile()``."""
    n = 50 if quick else 300
    with s.session() as client:
        ex = client.get_executor(pure=False)
        for i in range(20):
            ex.submit(inc, i).result()
        lat = []
        for i in range(n):
            start = time.perf_counter()
            ex.submit(inc, i).result()
            lat.append(time.perf_counter() - start)
        events = []
        for i in range(n):
            start = time.perf_counter()
            client.log_event("bench", i)
            client.get_events("bench")
            events.append(time.perf_counter() - start)
        client.gather(client.map(inc, range(2_000)))
        profiles = []
        for _ in range(5 if quick else 20):
            start = time.perf_counter()
            client.profile()
            profiles.append(time.perf_counter() - start)
    return {"executor_p50_ms": statistics.median(lat) * 1e3,
            "event_p50_ms": statistics.median(events) * 1e3,
            "profile_ms": statistics.median(profiles) * 1e3}  # fmt: skip


def w_scale(s: System, quick: bool, n_workers: int) -> dict[str, Any]:
    """How cost grows with the cluster: ``n_workers`` one-thread worker processes, a
    map of 20,000 trivial tasks (tasks/s), then the latency of 500 submits in a row."""
    n = 2_000 if quick else 20_000
    start = time.perf_counter()
    with s.session(n_workers=n_workers) as client:
        client.wait_for_workers(n_workers, timeout=300)
        started = time.perf_counter() - start
        client.gather(client.map(inc, range(-20 * n_workers, 0)))  # every worker warm
        time.sleep(0.2)
        start = time.perf_counter()
        results = client.gather(client.map(inc, range(n)))
        elapsed = time.perf_counter() - start
        assert results[-1] == n
        metrics = latency(client, quick)
    metrics.update(tasks_per_s=n / elapsed, seconds=elapsed, tasks=n, workers=n_workers,
                   startup_s=started)  # fmt: skip
    return metrics


SCALE_WORKERS = (2, 8, 32)
"""Worker processes of the ``scale<W>`` workloads (benchmarks/scaling.py)."""

WORKLOADS: dict[str, Callable[[System, bool], dict[str, Any]]] = {
    **{f"scale{w}": (lambda s, quick, w=w: w_scale(s, quick, w)) for w in SCALE_WORKERS},
    "api": w_api,
    "startup": w_startup,
    "map": w_map,
    "tree": w_tree,
    "small": w_small,
    "spill": w_spill,
    "spillback": lambda s, quick: w_spill(s, quick, readback=True),
}


def main(argv: list[str]) -> int:
    workload, system = argv[0], argv[1]
    quick = "--quick" in argv[2:]
    s = System(system)
    metrics = WORKLOADS[workload](s, quick)
    metrics.update(s.info)
    if "log" in s.info:  # how long a restart would replay this run's log
        from trioscheduler.core.recorder import replay
        from trioscheduler.server.event_log import read_log

        start = time.perf_counter()
        contents = read_log(s.info["log"])
        replay(contents.records)
        metrics["replay_s"] = time.perf_counter() - start
        metrics["log_bytes"] = contents.good_bytes
        import shutil

        shutil.rmtree(os.path.dirname(s.info["log"]), ignore_errors=True)
    metrics["peak_rss_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sys.stdout.flush()
    print("\n" + json.dumps(metrics, default=str), flush=True)
    os._exit(0)  # don't wait on lingering non-daemon threads of either system


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
