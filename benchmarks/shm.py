"""Same-host transfers through shared memory (issue 20): against loopback TCP and dask.

Every side is a fresh subprocess (``benchmarks._shm_child MODE``, modes there): ``on``
is trioscheduler as it comes (shared memory, large results placed in it as their task
returns), ``lazy`` never places results (a value is copied into a segment at its first
same-host fetch), ``off`` is loopback TCP (``TRIOSCHEDULER_SHARED_MEMORY=0``), ``dask``
is dask.distributed. Each subprocess runs three rounds on ``LocalCluster(3, 1,
processes=True)`` after a warm-up exchange and reports medians.

* ``shm-transfer-first``: the first transfer of a fresh 200 MB array from A to B (on:
  mapped, the copy was made as the task returned), against TCP;
* ``shm-transfer-shared``: a later transfer of the same array to a third worker C,
  against TCP. A sample whose transfer costs less than the timer's noise is capped at
  1 us (200 MB/us);
* ``shm-produce``: seconds to produce the array on A (the task, and the placing of its
  result), against ``lazy``: what placing costs the producer;
* ``shm-end-to-end``: seconds to produce a 200 MB array on A and read every page of it
  on B, against dask.distributed; ``shm-end-to-end-lazy`` the same against ``lazy``
  (does placing make the whole slower?), ``shm-end-to-end-tcp`` against TCP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks._harness import register

ROOT = Path(__file__).resolve().parent.parent
_cache: dict[tuple[str, bool], list[dict[str, Any]]] = {}
_used: dict[tuple[str, str, bool], int] = {}


def _child(mode: str, quick: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks._shm_child", mode, *(["--quick"] if quick else [])]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.splitlines()[-15:])
        raise RuntimeError(f"shm child ({mode}) failed (exit {proc.returncode}):\n{tail}")
    return dict(json.loads(lines[-1]))


def _metric(row: str, mode: str, metric: str) -> Any:
    """Each row reads each subprocess once; a row without a fresh one starts one."""

    def measure(quick: bool) -> float:
        runs = _cache.setdefault((mode, quick), [])
        k = _used.get((row, mode, quick), 0)
        if k >= len(runs):
            runs.append(_child(mode, quick))
        _used[row, mode, quick] = k + 1
        return float(runs[k][metric])

    return measure


_LABELS = {
    "off": "trioscheduler over loopback TCP (TRIOSCHEDULER_SHARED_MEMORY=0)",
    "lazy": "trioscheduler, results not placed (place-results never: copied at the first fetch)",
    "dask": "dask.distributed LocalCluster(3, 1, processes=True)",
}

for row, metric, ref, text, target in [
    ("shm-transfer-first", "first", "off", "MB/s of the first transfer of a fresh 200 MB "
     "array from worker A to B on the same host", 10.0),
    ("shm-transfer-shared", "later", "off", "MB/s of a later transfer of the same 200 MB "
     "array to a third worker C (already in shared memory on A)", 10.0),
    ("shm-produce", "produce", "lazy", "seconds to produce a 200 MB array on A (task and "
     "placing of its result)", None),
    ("shm-end-to-end", "e2e", "dask", "seconds to produce a 200 MB array on A and read "
     "every page of it on B", 1.0),
    ("shm-end-to-end-lazy", "e2e", "lazy", "seconds to produce a 200 MB array on A and "
     "read every page of it on B", None),
    ("shm-end-to-end-tcp", "e2e", "off", "seconds to produce a 200 MB array on A and read "
     "every page of it on B", None),
]:  # fmt: skip
    seconds = metric in ("produce", "e2e")
    register(
        row, description=f"{text}: trioscheduler against {ref} "
        "(LocalCluster(3, 1, processes=True), medians of 3 rounds per subprocess).",
        unit="s" if seconds else "MB/s", ours=_metric(row, "on", metric),
        reference=_metric(row, ref, metric), reference_label=_LABELS[ref],
        higher_is_better=not seconds, target=target,
    )  # fmt: skip
