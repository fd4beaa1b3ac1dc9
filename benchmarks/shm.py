"""Same-host transfers through shared memory (issue 20) against the loopback socket.

Both sides are trioscheduler in fresh subprocesses (``benchmarks._shm_child``), one with
shared memory (the default), one with ``TRIOSCHEDULER_SHARED_MEMORY=0``, so the ratio is
what shared memory buys over loopback TCP. dask's figure for the first transfer is row
``cluster-transfer`` (ours there uses shared memory by default).

* ``shm-transfer-first``: the first transfer of a fresh 200 MB array (copied once into a
  segment, warm after the first sample in each subprocess);
* ``shm-transfer-shared``: a later transfer of the same array to a third worker (already
  in a segment: mapped, nothing copied). A sample whose transfer costs less than the
  timer's noise is capped at 1 us (200 MB/us).
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


for row, metric, text, target in [
    ("shm-transfer-first", "first_mb_per_s", "the first transfer of a fresh 200 MB array "
     "from worker A to B on the same host", 2.0),
    ("shm-transfer-shared", "later_mb_per_s", "a later transfer of the same 200 MB array "
     "to a third worker C (already in shared memory on A)", 10.0),
]:  # fmt: skip
    register(
        row, description=f"MB/s of {text}: shared memory against loopback TCP "
        "(LocalCluster(3, 1, processes=True), medians of 3 per subprocess).",
        unit="MB/s", ours=_metric(row, "on", metric), reference=_metric(row, "off", metric),
        reference_label="trioscheduler over loopback TCP (TRIOSCHEDULER_SHARED_MEMORY=0)",
        target=target,
    )  # fmt: skip
