"""Coordination primitives and actors (issue 14): trioscheduler against dask.distributed.

Each sample is a fresh subprocess (``benchmarks._coordination_child``) running one
workload on one system; the harness alternates ours and dask's (ABBA):

* ``lock-roundtrip``: uncontended ``Lock`` acquire + release from the client (p50, µs);
* ``semaphore-contended``: 4 tasks, one ``Semaphore(max_leases=2)``, 100 acquire +
  release cycles each (cycles per second);
* ``actor-call``: an actor's method-call round trip from the client (p50, µs);
* ``actor-call-ray``: the same against Ray's actors, registered only where ``ray`` is
  installed (``pip install ray``; not in the ``bench`` extra: it is large).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks._harness import Measure, register

ROOT = Path(__file__).resolve().parent.parent


def run_child(workload: str, system: str, quick: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks._coordination_child", workload, system]
    if quick:
        cmd.append("--quick")
    proc = subprocess.run(
        cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.splitlines()[-15:])
        raise RuntimeError(f"{workload} on {system} failed (exit {proc.returncode}):\n{tail}")
    metrics: dict[str, Any] = json.loads(lines[-1])
    return metrics


def measure(workload: str, system: str, metric: str) -> Measure:
    def run(quick: bool) -> float:
        return float(run_child(workload, system, quick)[metric])

    return run


for name, workload, metric, unit, higher, description in (
    ("lock-roundtrip", "lock", "p50_us", "µs", False,
     "Uncontended Lock acquire+release from a sync client, 1 worker process (p50 of 500)."),
    ("semaphore-contended", "semaphore", "cycles_per_s", "cycles/s", True,
     "4 tasks on 2 workers x 2 threads share Semaphore(max_leases=2), 100 acquire+release "
     "cycles each."),
    ("actor-call", "actor", "p50_us", "µs", False,
     "Actor method call round trip, counter.increment().result() from a sync client (p50 of 500)."),
):  # fmt: skip
    register(
        name,
        description=description,
        unit=unit,
        higher_is_better=higher,
        ours=measure(workload, "trio", metric),
        reference=measure(workload, "dask", metric),
        reference_label="dask.distributed 2026.8.0",
    )

if importlib.util.find_spec("ray") is not None:
    register(
        "actor-call-ray",
        description="Actor method call round trip against Ray's actors: "
        "ray.get(counter.increment.remote()), local Ray instance of 2 CPUs (p50 of 500).",
        unit="µs",
        higher_is_better=False,
        ours=measure("actor", "trio", "p50_us"),
        reference=measure("actor", "ray", "p50_us"),
        reference_label="ray",
    )
