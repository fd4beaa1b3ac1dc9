"""Cluster workloads 1-7 of issue 6: trioscheduler against dask.distributed, end to end.

Every sample is one fresh subprocess (``benchmarks._cluster_child``) that starts
``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)`` with the dashboard
off, runs one group of workloads, and prints its metrics. The scheduler lives in that
subprocess for both systems, so its peak RSS is the scheduler's (and the client's).
Groups: ``startup``, ``map``, ``tree``, ``spill`` (one worker, 1 GiB) alone; ``small``
runs latency, transfer and array on one cluster, in that order.

Three systems: ``trio`` (ours), ``dask`` (dask.distributed defaults) and ``dask-inf``
(``worker-saturation = inf``, dask's best on small tasks). In each repetition of a
primary row ``cluster-<w>`` ours runs once and the two dask configurations run back to
back, their order flipping every time; the harness flips ours/reference (ABBA). Every
other row reads the same subprocesses' metrics (each row reads each run once):

* ``cluster-<w>-inf``: ours against dask with ``worker-saturation = inf``;
* ``cluster-map-mem`` / ``cluster-tree-mem``: peak RSS delta per task (bytes);
* ``cluster-latency-p99``; ``cluster-spill-completed``; ``cluster-spill-rss`` (the
  spilling worker's peak RSS);
* ``cluster-transfer-raw``: ours against a raw loopback socket
  (``benchmarks.wire.raw_large``: 200 MB x 3 ``sendall``, measured then and there).

A row selected without its primary runs fresh subprocesses. ``python -m benchmarks.cluster
summary RESULTS.json`` prints the three-column table of a run.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._harness import RESULTS_DIR, SharedRuns, register

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = {"quick": 240.0, "full": 600.0}


class Unsupported(Exception):
    """The workload is not (yet) supported by this system."""


# the metrics of each subprocess run so far, by (subprocess group, system), read by rows
_shared = SharedRuns()
# every sample's full metrics, for the record
SAMPLES: list[dict[str, Any]] = []
_flip: dict[str, int] = defaultdict(int)


DISK_WARM_UP_BYTES = 3 << 30
"""Written (zeros) and removed in the temp directory before the first spill sample.

On this VM the first few GB written after a pause cost ~1.5 s more than the same write
right after (``dd`` of 2.4 GB: 2.18 s, then 0.60 / 1.22 s); without a warm-up the first
spill sample, always ours, paid it alone (docs/performance.md, run 7). Neither system
runs during the warm-up, so both see the same disk."""
_disk_warm = False


def _warm_disk() -> None:
    import tempfile

    global _disk_warm
    if _disk_warm:
        return
    _disk_warm = True
    chunk = bytes(1 << 24)
    with tempfile.NamedTemporaryFile(prefix="bench-disk-warm-") as f:
        for _ in range(DISK_WARM_UP_BYTES // len(chunk)):
            f.write(chunk)
        f.flush()


def run_child(workload: str, system: str, quick: bool) -> dict[str, Any]:
    """One fresh subprocess; its metrics dict. Raises on failure, with its stderr."""
    if workload == "spill" and not quick:
        _warm_disk()
    cmd = [sys.executable, "-m", "benchmarks._cluster_child", workload, system]
    if quick:
        cmd.append("--quick")
    env = dict(os.environ)
    env.pop("DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION", None)  # the child sets it
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=TIMEOUT["quick" if quick else "full"],
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.splitlines()[-15:])
        raise RuntimeError(f"{workload} on {system} failed (exit {proc.returncode}):\n{tail}")
    metrics = json.loads(lines[-1])
    metrics["workload"] = workload
    if not SAMPLES:
        atexit.register(_write_samples)
    SAMPLES.append(metrics)
    return metrics


def _write_samples() -> None:
    """Every subprocess's full metrics, next to the harness's results of the run."""
    directory = RESULTS_DIR
    if "--out" in sys.argv[:-1]:  # ``python -m benchmarks --out DIR``
        directory = Path(sys.argv[sys.argv.index("--out") + 1])
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = directory / f"{stamp}-cluster-samples.json"
    path.write_text(json.dumps(SAMPLES, indent=1, default=str) + "\n")
    print(f"cluster samples: {path}")


def _value(metrics: dict[str, Any], metric: str) -> float:
    if metric in metrics:
        return float(metrics[metric])
    why = [f"{k}: {v}" for k, v in metrics.items() if k.endswith(("unsupported", "error"))]
    raise Unsupported(f"{metrics['system']}: no {metric!r} ({'; '.join(why) or 'not measured'})")


def take(row: str, group: str, system: str, metric: str, quick: bool) -> float:
    """``row``'s next sample: from the next run of ``group`` this row has not read yet.

    Every row reads each subprocess once, so the rows derived from one workload report
    the very runs its primary row made; a row that runs out starts a fresh subprocess.
    """
    run = _shared.take(row, (group, system), lambda: run_child(group, system, quick))
    return _value(run, metric)


def derived(row: str, group: str, system: str, metric: str) -> Callable[[bool], float]:
    return lambda quick: take(row, group, system, metric, quick)


def both_dasks(row: str, group: str, metric: str) -> Callable[[bool], float]:
    """The reference side: dask default, after running it and dask-inf in alternating order."""

    def measure(quick: bool) -> float:
        if _shared.unread(row, (group, "dask")):
            order = ["dask", "dask-inf"] if _flip[group] % 2 == 0 else ["dask-inf", "dask"]
            _flip[group] += 1
            for system in order:
                _shared.runs[group, system].append(run_child(group, system, quick))
        return take(row, group, "dask", metric, quick)

    return measure


# name, subprocess group, description, unit, metric, higher is better,
# target ratio vs dask default, target ratio vs dask with worker-saturation=inf
WORKLOADS = [
    ("startup", "startup", "1. start-up: cluster + client, one trivial result, close (s).",
     "s", "seconds", False, 2.0, 2.0),
    ("map", "map", "2. client.map(inc, range(20_000)) + gather after a warm-up (tasks/s).",
     "tasks/s", "tasks_per_s", True, 8.0, 2.0),
    ("latency", "small", "3. p50 of submit(inc, i, pure=False).result(), 500 in a row after "
     "20 warm-up calls (ms).", "ms", "p50_ms", False, 10.0, None),
    ("tree", "tree", "4. dask.delayed binary-tree reduction over 8,192 leaves, 16,383 tasks, "
     "client.compute(root).result() (tasks/s).", "tasks/s", "tasks_per_s", True, 8.0, 2.0),
    ("array", "small", "5. (x + x.T).mean(), x = da.random.random((8000, 8000), chunks=500), "
     "client.compute(expr).result() (s).", "s", "array_s", False, None, 1.0),
    ("transfer", "small", "6. 200 MB made on worker A, consumed by a task pinned to B: MB/s of "
     "the dependency transfer (remote consumer's round trip minus a local consumer's, median "
     "of 3 in each subprocess).", "MB/s", "mb_per_s", True, None, None),
    ("spill", "spill", "7. one worker, memory_limit=1GiB: 30 x 100 MB random arrays, then "
     "map(first) and one task summing them (s, from the first submit to the sum).",
     "s", "seconds", False, 1 / 0.75, None),
]  # fmt: skip

for name, group, description, unit, metric, higher, target, target_inf in WORKLOADS:
    register(
        f"cluster-{name}", description=description, unit=unit, higher_is_better=higher,
        ours=derived(f"cluster-{name}", group, "trio", metric),
        reference=both_dasks(f"cluster-{name}", group, metric),
        reference_label="dask.distributed (default)", target=target,
    )  # fmt: skip
    register(
        f"cluster-{name}-inf", description=description + " The same subprocesses as above.",
        unit=unit, higher_is_better=higher,
        ours=derived(f"cluster-{name}-inf", group, "trio", metric),
        reference=derived(f"cluster-{name}-inf", group, "dask-inf", metric),
        reference_label="dask.distributed (worker-saturation=inf)", target=target_inf,
    )  # fmt: skip

for name in ("map", "tree"):
    register(
        f"cluster-{name}-mem",
        description=f"Peak RSS delta per task of the scheduler process during '{name}' "
        "(bytes/task; the scheduler and the client share that process in both systems).",
        unit="B/task", higher_is_better=False, target=2.0,
        ours=derived(f"cluster-{name}-mem", name, "trio", "bytes_per_task"),
        reference=derived(f"cluster-{name}-mem", name, "dask", "bytes_per_task"),
        reference_label="dask.distributed (default)",
    )  # fmt: skip
register(
    "cluster-spill-completed",
    description="7. share of spill runs that returned the right sum without the worker "
    "being restarted (1 = all).", unit="completed",
    ours=derived("cluster-spill-completed", "spill", "trio", "completed"),
    reference=derived("cluster-spill-completed", "spill", "dask", "completed"),
    reference_label="dask.distributed (default)",
)  # fmt: skip
register(
    "cluster-spill-rss",
    description="7. peak RSS of the spilling worker process (MB, VmHWM read by client.run "
    "after the sum; issue 20: no higher than dask's).", unit="MB", higher_is_better=False,
    target=1.0, ours=derived("cluster-spill-rss", "spill", "trio", "worker_peak_rss_mb"),
    reference=derived("cluster-spill-rss", "spill", "dask", "worker_peak_rss_mb"),
    reference_label="dask.distributed (default)",
)  # fmt: skip
register(
    "cluster-latency-p99", description="3. p99 of the same 500 submits (ms).", unit="ms",
    higher_is_better=False, ours=derived("cluster-latency-p99", "small", "trio", "p99_ms"),
    reference=derived("cluster-latency-p99", "small", "dask", "p99_ms"),
    reference_label="dask.distributed (default)",
)  # fmt: skip


for name, metric, description in (
    ("executor", "executor_p50_ms", "p50 of get_executor().submit(inc, i).result(), 300 in a "
     "row after 20 warm-up calls (ms)."),
    ("event", "event_p50_ms", "p50 of log_event('bench', i) then get_events('bench'), 300 "
     "in a row (ms; the list grows to 300 events)."),
    ("profile", "profile_ms", "median of 20 client.profile() calls after 2,000 tasks ran "
     "(ms)."),
):
    register(
        f"cluster-api-{name}", description=f"Client API (issue 13): {description}",
        unit="ms", higher_is_better=False,
        ours=derived(f"cluster-api-{name}", "api", "trio", metric),
        reference=derived(f"cluster-api-{name}", "api", "dask", metric),
        reference_label="dask.distributed (default)",
    )  # fmt: skip


def _raw(quick: bool) -> float:
    from benchmarks.wire import raw_large

    return raw_large(quick)


register(
    "cluster-transfer-raw",
    description="6. the same trioscheduler transfer samples against a raw loopback socket "
    "(socket.sendall of 200 MB x 3 between two threads), measured now.",
    unit="MB/s", ours=derived("cluster-transfer-raw", "small", "trio", "mb_per_s"), reference=_raw,
    reference_label="raw loopback socket", target=0.8,
)  # fmt: skip


# ------------------------------------------------------------------------ the summary


def summary(path: Path) -> str:
    """The three-column markdown table (ours, dask default, dask inf) of a results file."""
    rows = {r["name"]: r for r in json.loads(path.read_text())["results"]}

    def fmt(x: float | None) -> str:
        if x is None:
            return "n/a"
        return f"{x:,.3g}" if abs(x) < 100 else f"{x:,.0f}"

    def ratio(r: dict[str, Any] | None) -> str:
        if not r or r.get("error"):
            return "n/a"
        text = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        if r["target"] is not None and r["ratio"] is not None:
            text += f" (target >= {r['target']:.2g}x: {'met' if r['target_met'] else 'MISSED'})"
        return text

    lines = [
        "| workload | unit | trioscheduler | dask default | dask inf | ratio vs default | ratio vs inf |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, *_ in WORKLOADS:
        main, inf = rows.get(f"cluster-{name}"), rows.get(f"cluster-{name}-inf")
        if main is None:
            continue
        if main.get("error"):
            why = [line for line in main["error"].splitlines() if line.strip()][-1][:160]
            lines.append(f"| {name} | | {why} | | | | |")
            continue
        lines.append(
            f"| {name} | {main['unit']} | {fmt(main['ours_median'])} | {fmt(main['reference_median'])} "
            f"| {fmt(inf['reference_median'] if inf else None)} | {ratio(main)} | {ratio(inf)} |"
        )
    extras = (
        "cluster-map-mem",
        "cluster-tree-mem",
        "cluster-latency-p99",
        "cluster-transfer-raw",
        "cluster-spill-completed",
        "cluster-spill-rss",
    )
    for extra in extras:
        r = rows.get(extra)
        if r and not r.get("error"):
            lines.append(
                f"| {extra.removeprefix('cluster-')} | {r['unit']} | {fmt(r['ours_median'])} "
                f"| {r['reference_label']}: {fmt(r['reference_median'])} | | {ratio(r)} | |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "summary":
        print(summary(Path(sys.argv[2])))
    else:
        raise SystemExit(
            "usage: python -m benchmarks.cluster summary benchmarks/results/<run>.json"
        )
