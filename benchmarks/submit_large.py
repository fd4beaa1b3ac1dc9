"""Large submit arguments (issue 20): a 500 MB numpy array as a ``submit`` argument.

Each sample is a fresh subprocess (``benchmarks._submit_child``) with a one-worker
process cluster; the figure is the seconds of ``submit(nbytes_of, a, pure=False)
.result()`` (median of 3 after a warm-up), from the client's call to the result.

* ``submit-large``: ours against dask.distributed;
* ``submit-large-inband``: ours against ours with the run spec pickled in line (the
  path before out-of-band run specs: the array copied into the pickle on the client);
* ``scatter-large``: ``c.submit(nbytes_of, c.scatter(a)).result()``, ours against dask;
* ``scatter-large-bytes``: ``c.submit(len, c.scatter(b)).result()``, ``b`` 200 MB of
  ``bytes``, ours against dask (smaller: dask's key of a ``bytes`` hashes its ``repr``,
  ~10 s for 200 MB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks._harness import Measure, register

ROOT = Path(__file__).resolve().parent.parent


def _child(system: str, *extra: str) -> Measure:
    def measure(quick: bool) -> float:
        cmd = [sys.executable, "-m", "benchmarks._submit_child", system, *extra,
               *(["--quick"] if quick else [])]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = "\n".join(proc.stderr.splitlines()[-15:])
            raise RuntimeError(f"submit child ({system}) failed (exit {proc.returncode}):\n{tail}")
        return float(json.loads(lines[-1])["seconds"])

    return measure


register(
    "submit-large", description="s of submit(nbytes_of, a 500 MB numpy array, pure=False)"
    ".result() on a one-worker process cluster (fresh subprocess per sample, median of 3).",
    unit="s", higher_is_better=False, ours=_child("trio"), reference=_child("dask"),
    reference_label="dask.distributed (default)", target=1.0,
)  # fmt: skip
register(
    "submit-large-inband", description="the same, against ours with the run spec pickled "
    "in line (the array copied into the pickle on the client, as before issue 20).",
    unit="s", higher_is_better=False, ours=_child("trio"), reference=_child("trio-inband"),
    reference_label="trioscheduler, run spec in line", target=1.0,
)  # fmt: skip
register(
    "scatter-large", description="s of c.submit(nbytes_of, c.scatter(a)).result(), a a 500 MB "
    "numpy array (hashed for its key in both), one-worker process cluster.",
    unit="s", higher_is_better=False, ours=_child("trio", "--scatter"),
    reference=_child("dask", "--scatter"), reference_label="dask.distributed (default)",
    target=1.0,
)  # fmt: skip
register(
    "scatter-large-bytes", description="s of c.submit(len, c.scatter(b)).result(), b 200 MB of "
    "bytes (hashed for its key in both), one-worker process cluster.",
    unit="s", higher_is_better=False, ours=_child("trio", "--bytes"),
    reference=_child("dask", "--bytes"), reference_label="dask.distributed (default)",
    target=1.0,
)  # fmt: skip
