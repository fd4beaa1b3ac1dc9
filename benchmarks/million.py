"""A million tasks (issue 20): ``client.map(inc, range(1_000_000))`` plus gather, and a
dask.delayed graph of a million tasks, against dask.distributed on 100,000.

Each sample is one fresh subprocess (``benchmarks._million_child``) with the scheduler
and two one-thread workers as processes of their own (each system's CLI), so the
client's and the scheduler's peak RSS are measured apart. dask.distributed needs ~344 s
for 200,000 such tasks on this machine, so it runs the 100,000 version; the rows
compare rates (tasks/s) and bytes per task, and the ``-100k`` rows run both systems on
the same 100,000.

* ``million-map`` / ``million-delayed``: tasks/s, ours on 1M against dask on 100k;
* ``million-map-100k`` / ``million-delayed-100k``: tasks/s, both on 100k;
* ``million-map-client-rss`` / ``-scheduler-rss`` (and ``million-delayed-...``): peak
  RSS in MB, ours on 1M against dask on 100k (the target: under 1,000 MB each at 1M).

``--quick`` divides every size by 100.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from benchmarks._harness import Measure, SharedRuns, register
from benchmarks.cluster import ROOT

SIZES = {"trio": 1_000_000, "dask": 100_000}
_shared = SharedRuns()  # rows of one workload and size read the same runs


def run_child(workload: str, system: str, n: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks._million_child", workload, system, str(n)]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=3600
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.splitlines()[-15:])
        raise RuntimeError(f"{workload} {n} on {system} failed (exit {proc.returncode}):\n{tail}")
    metrics: dict[str, Any] = json.loads(lines[-1])
    print(f"    {json.dumps(metrics)}", flush=True)
    return metrics


def _take(row: str, workload: str, system: str, n: int, metric: str) -> Measure:
    """``row``'s next sample of ``metric``; rows of one workload and size share runs."""

    def measure(quick: bool) -> float:
        size = max(n // 100, 1_000) if quick else n
        run = _shared.take(row, (workload, system, size), lambda: run_child(workload, system, size))
        value = float(run[metric])
        return value / 1e6 if metric.endswith("_rss") else value

    return measure


for workload, what in (
    ("map", "client.map(inc, range(N)) + gather"),
    ("delayed", "client.compute of a dask.delayed graph of N tasks (N/2 inc leaves summed "
     "pairwise to one root)"),
):  # fmt: skip
    register(
        f"million-{workload}",
        description=f"{what}: tasks/s, ours with N = 1,000,000 against dask with N = "
        "100,000 (scheduler and 2 one-thread workers as processes; fresh per sample).",
        unit="tasks/s",
        ours=_take(f"million-{workload}", workload, "trio", SIZES["trio"], "tasks_per_s"),
        reference=_take(f"million-{workload}", workload, "dask", SIZES["dask"], "tasks_per_s"),
        reference_label="dask.distributed on 100k",
    )
    register(
        f"million-{workload}-100k",
        description=f"{what}: tasks/s, both with N = 100,000.",
        unit="tasks/s",
        ours=_take(f"million-{workload}-100k", workload, "trio", 100_000, "tasks_per_s"),
        reference=_take(f"million-{workload}-100k", workload, "dask", 100_000, "tasks_per_s"),
        reference_label="dask.distributed (default)",
    )
    for side in ("client", "scheduler"):
        register(
            f"million-{workload}-{side}-rss",
            description=f"peak RSS of the {side} process during million-{workload} (MB; "
            "ours at 1M, dask at 100k; the same subprocesses). Target: under 1,000 MB at 1M.",
            unit="MB", higher_is_better=False,
            ours=_take(f"million-{workload}-{side}-rss", workload, "trio", SIZES["trio"],
                       f"{side}_peak_rss"),
            reference=_take(f"million-{workload}-{side}-rss", workload, "dask", SIZES["dask"],
                            f"{side}_peak_rss"),
            reference_label="dask.distributed on 100k",
        )  # fmt: skip
