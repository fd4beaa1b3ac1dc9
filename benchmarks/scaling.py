"""How cost grows with the cluster (issue 20): 2, 8 and 32 worker processes.

Each sample is one fresh subprocess (``benchmarks._cluster_child scale<W>``) that starts
``LocalCluster(n_workers=W, threads_per_worker=1, processes=True)`` for one system, runs
``client.map(inc, range(20_000))`` plus gather (tasks/s) and then 500 ``submit(inc, i)
.result()`` in a row (p50 latency), and closes. Rows, ours against dask.distributed
(default config) from the very same subprocesses:

* ``scaling-map-<W>``: tasks/s; ``scaling-latency-<W>``: p50 ms.

After a run that measured them, the curve is drawn (matplotlib) to
``benchmarks/results/<stamp>-scaling.png`` and, for a full (not ``--quick``) run, to
``docs/scaling.png``, which docs/performance.md shows. ``python -m benchmarks.scaling
plot SAMPLES.json [OUT.png]`` redraws it from a run's ``*-cluster-samples.json``.
"""

from __future__ import annotations

import atexit
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import cluster
from benchmarks._cluster_child import SCALE_WORKERS
from benchmarks._harness import RESULTS_DIR, register

DOCS_PLOT = cluster.ROOT / "docs" / "scaling.png"
_state = {"measured": False, "quick": False, "hooked": False}


def _measure(row: str, workers: int, system: str, metric: str) -> Any:
    def measure(quick: bool) -> float:
        _state["measured"], _state["quick"] = True, quick
        if not _state["hooked"]:
            _state["hooked"] = True
            atexit.register(_plot_after_run)
        return cluster.take(row, f"scale{workers}", system, metric, quick)

    return measure


for w in SCALE_WORKERS:
    register(
        f"scaling-map-{w}",
        description=f"client.map(inc, range(20_000)) + gather on {w} one-thread worker "
        "processes (tasks/s; fresh LocalCluster per sample).",
        unit="tasks/s", ours=_measure(f"scaling-map-{w}", w, "trio", "tasks_per_s"),
        reference=_measure(f"scaling-map-{w}", w, "dask", "tasks_per_s"),
        reference_label="dask.distributed (default)",
    )  # fmt: skip
    register(
        f"scaling-latency-{w}",
        description=f"p50 of submit(inc, i, pure=False).result(), 500 in a row, on {w} "
        "one-thread worker processes (ms; the same subprocesses as scaling-map).",
        unit="ms", higher_is_better=False,
        ours=_measure(f"scaling-latency-{w}", w, "trio", "p50_ms"),
        reference=_measure(f"scaling-latency-{w}", w, "dask", "p50_ms"),
        reference_label="dask.distributed (default)",
    )  # fmt: skip


def curves(samples: list[dict[str, Any]]) -> dict[str, dict[str, dict[int, float]]]:
    """``{system: {metric: {workers: median}}}`` of the scale samples of a run."""
    values: dict[tuple[str, str, int], list[float]] = {}
    for s in samples:
        if not str(s.get("workload", "")).startswith("scale"):
            continue
        for metric in ("tasks_per_s", "p50_ms"):
            if metric in s:
                values.setdefault((s["system"], metric, int(s["workers"])), []).append(
                    float(s[metric])
                )
    out: dict[str, dict[str, dict[int, float]]] = {}
    for (system, metric, workers), xs in sorted(values.items()):
        out.setdefault(system, {}).setdefault(metric, {})[workers] = statistics.median(xs)
    return out


def plot(samples: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Tasks/s and p50 latency against worker processes, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curves(samples)
    labels = {"trio": "trioscheduler", "dask": "dask.distributed"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for system, by_metric in data.items():
        for ax, metric in ((left, "tasks_per_s"), (right, "p50_ms")):
            points = sorted(by_metric.get(metric, {}).items())
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=labels.get(system, system))
    for ax, ylabel in ((left, "map of 20,000 tasks: tasks/s"), (right, "submit -> result p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(SCALE_WORKERS), [str(w) for w in SCALE_WORKERS])
        ax.set_yscale("log")
        ax.set_xlabel("worker processes (1 thread each) on 2 cores")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title or "How cost grows with the number of workers")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_after_run() -> None:
    if not _state["measured"]:
        return
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    title = f"How cost grows with the number of workers ({stamp}, medians)"
    try:
        paths = [plot(cluster.SAMPLES, RESULTS_DIR / f"{stamp}-scaling.png", title)]
        if not _state["quick"]:
            paths.append(plot(cluster.SAMPLES, DOCS_PLOT, title))
    except ImportError as exc:
        print(f"scaling plot skipped: {exc} (pip install matplotlib)")
        return
    print("scaling plot: " + " ".join(str(p) for p in paths))


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "plot":
        src = Path(sys.argv[2])
        out = Path(sys.argv[3]) if len(sys.argv) == 4 else DOCS_PLOT
        print(plot(json.loads(src.read_text()), out))
    else:
        raise SystemExit("usage: python -m benchmarks.scaling plot SAMPLES.json [OUT.png]")
