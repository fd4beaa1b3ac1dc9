"""One sample of a huge workload on one system, with the scheduler in its own process.

``python -m benchmarks._million_child WORKLOAD SYSTEM N [--workers W]`` prints one JSON
line. ``WORKLOAD`` is ``map`` (``client.map(inc, range(N))`` then ``client.gather``) or
``delayed`` (a dask.delayed graph of ``N`` tasks: ``N/2`` independent ``inc`` leaves
summed pairwise, level by level, to one root, computed with ``client.compute``);
``SYSTEM`` is ``trio`` or ``dask``. With ``--by-value`` the map's function is one
defined in this script (``__main__``, as in most users' scripts), which cloudpickle ships
by value, instead of one the workers import.

The scheduler is started with the system's CLI (``python -m trioscheduler scheduler`` /
``dask scheduler``) and the workers likewise (``W`` processes, one thread each), so the
client (this process) and the scheduler have RSS of their own: both are sampled every
20 ms and their peaks reported (``client_peak_rss`` / ``scheduler_peak_rss``, bytes).
The CPU seconds (user + system) each side spent in the timed block are reported too
(``client_cpu_s``, ``scheduler_cpu_s``, ``workers_cpu_s``: all worker processes), and
the client's user thread's own (``user_thread_cpu_s``, and ``submit_thread_cpu_s`` up to
the return of ``map``): on a shared machine these move
far less with the load than the wall figures do.
The children inherit this process's environment (``PYTHONPATH`` included) and
interpreter, so they run the same trioscheduler as this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from benchmarks._cluster_tasks import add, inc

START_TIMEOUT = 60.0


def script_inc(x: int) -> int:
    """``inc`` defined in the script the user runs (``__main__``: shipped by value)."""
    return x + 1


class Peaks:
    """Peak RSS of some processes, sampled in a thread (plus this process's ru_maxrss)."""

    def __init__(self, procs: dict[str, psutil.Process], interval: float = 0.02) -> None:
        self.procs = procs
        self.interval = interval
        self.peak = dict.fromkeys(procs, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for name, proc in self.procs.items():
            try:
                self.peak[name] = max(self.peak[name], proc.memory_info().rss)
            except psutil.Error:
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Peaks:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _cpu_s(proc: psutil.Process, recursive: bool = False) -> float:
    total = 0.0
    for p in [proc, *(proc.children(recursive=True) if recursive else [])]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def _cpu(me: psutil.Process, sched: psutil.Process, workers: psutil.Process) -> dict[str, float]:
    """CPU seconds so far of the client (this process), the scheduler and all workers."""
    return {
        "client": _cpu_s(me),
        "scheduler": _cpu_s(sched),
        "workers": _cpu_s(workers, recursive=True),
    }


def _wait_for_file(path: Path, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the scheduler exited with {proc.returncode}")
        if path.exists() and path.stat().st_size:
            try:
                return dict(json.loads(path.read_text()))
            except json.JSONDecodeError:
                pass
        time.sleep(0.05)
    raise RuntimeError("the scheduler did not write its file in time")


@contextmanager
def cluster(
    system: str, n_workers: int
) -> Iterator[tuple[str, psutil.Process, psutil.Process]]:
    """A scheduler and ``n_workers`` one-thread workers, each its own process."""
    py = sys.executable
    quiet = subprocess.DEVNULL
    with tempfile.TemporaryDirectory(prefix="bench-million-") as tmp:
        sfile = Path(tmp) / "scheduler.json"
        if system == "trio":
            sched_cmd = [py, "-m", "trioscheduler", "--log-level", "warning", "scheduler",
                         "--port", "0", "--no-dashboard", "--scheduler-file", str(sfile)]
            worker_cmd = [py, "-m", "trioscheduler", "--log-level", "warning", "worker",
                          "--scheduler-file", str(sfile), "--nworkers", str(n_workers),
                          "--nthreads", "1", "--local-directory", tmp]  # fmt: skip
        else:
            sched_cmd = [py, "-m", "distributed.cli.dask_scheduler", "--port", "0",
                         "--no-dashboard", "--scheduler-file", str(sfile)]
            worker_cmd = [py, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                          str(sfile), "--nworkers", str(n_workers), "--nthreads", "1",
                          "--local-directory", tmp, "--no-dashboard"]  # fmt: skip
        sched = subprocess.Popen(sched_cmd, stdout=quiet, stderr=quiet)
        workers: subprocess.Popen[bytes] | None = None
        try:
            address = _wait_for_file(sfile, sched)["address"]
            workers = subprocess.Popen(worker_cmd, stdout=quiet, stderr=quiet)
            yield address, psutil.Process(sched.pid), psutil.Process(workers.pid)
        finally:
            for proc in (workers, sched):
                if proc is not None:
                    proc.terminate()
            for proc in (workers, sched):
                if proc is not None:
                    try:
                        proc.wait(20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()


def connect(system: str, address: str, n_workers: int) -> Any:
    if system == "trio":
        from trioscheduler import Client
    else:
        from distributed import Client
    client = Client(address)
    client.wait_for_workers(n_workers, timeout=START_TIMEOUT)
    client.gather(client.map(inc, range(-200, 0)))  # workers warm, functions imported
    return client


def delayed_graph(n: int) -> tuple[Any, int]:
    """A pairwise sum over ``n // 2`` ``inc`` leaves: about ``n`` tasks; (root, expected)."""
    from dask import delayed

    leaves = max(n // 2, 1)
    layer = [delayed(inc)(i) for i in range(leaves)]
    while len(layer) > 1:
        nxt = [delayed(add)(layer[i], layer[i + 1]) for i in range(0, len(layer) - 1, 2)]
        if len(layer) % 2:
            nxt.append(layer[-1])
        layer = nxt
    return layer[0], leaves * (leaves + 1) // 2


def run(
    workload: str, system: str, n: int, n_workers: int, by_value: bool = False
) -> dict[str, Any]:
    out: dict[str, Any] = {"workload": workload, "system": system, "n": n, "workers": n_workers}
    fn = script_inc if by_value else inc
    if by_value:
        out["by_value"] = True
    with cluster(system, n_workers) as (address, sched, workers):
        client = connect(system, address, n_workers)
        try:
            me = psutil.Process()
            out["client_rss_before"] = me.memory_info().rss
            out["scheduler_rss_before"] = sched.memory_info().rss
            with Peaks({"client": me, "scheduler": sched}) as peaks:
                cpu_before = _cpu(me, sched, workers)
                thread_before = time.thread_time()
                start = time.perf_counter()
                if workload == "map":
                    futures = client.map(fn, range(n))
                    out["submit_s"] = time.perf_counter() - start
                    out["submit_thread_cpu_s"] = time.thread_time() - thread_before
                    results = client.gather(futures)
                    assert len(results) == n and results[-1] == n, results[-1]
                    tasks = n
                    del futures, results
                else:
                    root, expected = delayed_graph(n)
                    tasks = len(root.__dask_graph__())
                    out["build_s"] = time.perf_counter() - start
                    value = client.compute(root).result()
                    assert value == expected, (value, expected)
                    del root
                elapsed = time.perf_counter() - start
                out["user_thread_cpu_s"] = time.thread_time() - thread_before
                cpu_after = _cpu(me, sched, workers)
            for side, after in cpu_after.items():
                out[f"{side}_cpu_s"] = after - cpu_before[side]
        finally:
            client.close()
    out.update(
        seconds=elapsed,
        tasks=tasks,
        tasks_per_s=tasks / elapsed,
        client_peak_rss=peaks.peak["client"],
        scheduler_peak_rss=peaks.peak["scheduler"],
    )
    return out


def main(argv: list[str]) -> int:
    workload, system, n = argv[0], argv[1], int(argv[2])
    n_workers = int(argv[argv.index("--workers") + 1]) if "--workers" in argv else 2
    metrics = run(workload, system, n, n_workers, by_value="--by-value" in argv)
    print("\n" + json.dumps(metrics), flush=True)
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
