"""The cost of the scheduler's recovery log (issue 18): map and tree with and without it.

``python -m benchmarks recover-map recover-tree``: each sample is a fresh subprocess
(``benchmarks._cluster_child map|tree trio-log`` against ``... trio``):
``LocalCluster(n_workers=2, threads_per_worker=1)`` whose scheduler runs with
``recover_from=`` a fresh log file in a temporary directory (default fsync policy: at
most once a second) or without a log. Ours is "with the log", the reference "without"
(the same code): the ratio is the throughput kept, 1.0 = free. ``recover-map-cpu`` and
``recover-tree-cpu`` count tasks per CPU second of the process holding the scheduler and
the client (``time.process_time``), which a loaded machine disturbs less than wall time.

The ``trio-log`` child also reports ``replay_s`` and ``log_bytes``: how long reading and
replaying its own log took after the run (what a restart from it would take before the
scheduler listens again), and the log's size.
"""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks._harness import child_result, register

ROOT = Path(__file__).resolve().parent.parent


def _child(workload: str, system: str, quick: bool) -> dict[str, float]:
    args = [workload, system, *(["--quick"] if quick else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    return child_result("benchmarks._cluster_child", *args, env=env)


def _rate(workload: str, system: str, metric: str):  # type: ignore[no-untyped-def]
    def measure(quick: bool) -> float:
        return float(_child(workload, system, quick)[metric])

    return measure


_METRICS = {
    "": ("tasks_per_s", "tasks/s", "with Scheduler(recover_from=) against without it (the log's cost)"),
    "-cpu": ("tasks_per_cpu_s", "tasks/CPU-s", "tasks per CPU second of the scheduler+client "
             "process, with the log against without (less sensitive to load than wall time)"),
}  # fmt: skip
for _w in ("map", "tree"):
    for _suffix, (_metric, _unit, _what) in _METRICS.items():
        register(
            f"recover-{_w}{_suffix}",
            ours=_rate(_w, "trio-log", _metric),
            reference=_rate(_w, "trio", _metric),
            reference_label="trioscheduler without the log",
            unit=_unit,
            description=f"cluster {_w}: {_what}",
        )
