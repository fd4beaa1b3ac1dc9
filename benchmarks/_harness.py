"""A small side-by-side benchmark harness: trioscheduler against a reference.

A *workload* is two callables that each measure one thing the same way and return
one number: ``ours(quick)`` and ``reference(quick)`` (``quick`` asks for a smaller
size, for smoke runs). Each callable does its own set-up and times only the part being
compared, so a cluster start-up stays out of a throughput number unless start-up is the
thing measured. The harness runs the two sides alternately (ours, ref, ref, ours, ...)
at least three times, so drift of a noisy machine hits both alike, and reports medians
and their ratio, oriented so that a ratio above 1 means trioscheduler is better.

To add workloads, create a module ``benchmarks/<topic>.py`` that calls ``register``
at import time; ``python -m benchmarks`` imports every such module.

Results are printed as a table and written to ``benchmarks/results/`` as JSON (for
tools) and markdown (for humans), one pair per run.
"""

from __future__ import annotations

import fnmatch
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Measure = Callable[[bool], float]

RESULTS_DIR = Path(__file__).parent / "results"
MIN_REPEAT = 3


@dataclass(slots=True)
class Workload:
    """One comparison. ``unit`` names what the callables return (``"MB/s"``, ``"s"``)."""

    name: str
    description: str
    unit: str
    ours: Measure
    reference: Measure
    reference_label: str
    higher_is_better: bool = True
    target: float | None = None  # the ratio we aim for (see ``Result.ratio``)
    repeat: int = MIN_REPEAT


@dataclass(slots=True)
class Result:
    name: str
    description: str
    unit: str
    reference_label: str
    higher_is_better: bool
    target: float | None
    ours: list[float] = field(default_factory=list)
    reference: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ours_median(self) -> float | None:
        return statistics.median(self.ours) if self.ours else None

    @property
    def reference_median(self) -> float | None:
        return statistics.median(self.reference) if self.reference else None

    @property
    def ratio(self) -> float | None:
        """How many times better we are: ours/ref for rates, ref/ours for durations."""
        o, r = self.ours_median, self.reference_median
        if not o or not r:
            return None
        return o / r if self.higher_is_better else r / o

    @property
    def met(self) -> bool | None:
        ratio = self.ratio
        if self.target is None or ratio is None:
            return None
        return ratio >= self.target

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d.update(
            ours_median=self.ours_median,
            reference_median=self.reference_median,
            ratio=self.ratio,
            target_met=self.met,
        )
        return d


REGISTRY: dict[str, Workload] = {}


class SharedRuns:
    """Rows that read their samples from the same runs (one subprocess's metrics feed
    several rows): each row reads each run of a ``key`` once, in order, and a row that
    has read them all starts a fresh one (``make()``)."""

    def __init__(self) -> None:
        self.runs: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        self.read: dict[tuple[str, Any], int] = defaultdict(int)

    def unread(self, row: str, key: Any) -> bool:
        """Whether ``row`` would start a fresh run of ``key`` now."""
        return self.read[row, key] >= len(self.runs[key])

    def take(self, row: str, key: Any, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``row``'s next run of ``key``."""
        runs, i = self.runs[key], self.read[row, key]
        if i == len(runs):
            runs.append(make())
        self.read[row, key] = i + 1
        return runs[i]


def child_result(
    module: str, *args: str, timeout: float = 600, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``python -m module args...`` from the repository root (a fresh process per
    sample) and return the JSON object its last line of output holds."""
    argv = [sys.executable, "-m", module, *args]
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        argv, cwd=root, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def register(
    name: str,
    *,
    ours: Measure,
    reference: Measure,
    reference_label: str,
    unit: str,
    description: str = "",
    higher_is_better: bool = True,
    target: float | None = None,
    repeat: int = MIN_REPEAT,
) -> Workload:
    """Add a workload under ``name`` (unique); returns it."""
    if name in REGISTRY:
        raise ValueError(f"benchmark workload {name!r} registered twice")
    workload = Workload(
        name, description, unit, ours, reference, reference_label, higher_is_better,
        target, max(repeat, MIN_REPEAT),
    )  # fmt: skip
    REGISTRY[name] = workload
    return workload


def select(patterns: Sequence[str]) -> list[Workload]:
    """Workloads whose names match any of ``patterns`` (globs, or prefixes like ``wire``)."""
    if not patterns:
        return list(REGISTRY.values())
    chosen: list[Workload] = []
    for pattern in patterns:
        matches = [
            w for name, w in REGISTRY.items()
            if fnmatch.fnmatch(name, pattern) or name.startswith(pattern + "-") or name == pattern
        ]  # fmt: skip
        if not matches:
            known = ", ".join(REGISTRY) or "none"
            raise SystemExit(f"no benchmark workload matches {pattern!r}; known: {known}")
        chosen.extend(w for w in matches if w not in chosen)
    return chosen


def _measure(fn: Measure, quick: bool) -> float:
    gc.collect()
    return float(fn(quick))


def run_workload(workload: Workload, repeat: int | None = None, quick: bool = False) -> Result:
    """Alternate the two sides ``repeat`` times (ABBA order); errors are recorded, not raised."""
    result = Result(
        workload.name, workload.description, workload.unit, workload.reference_label,
        workload.higher_is_better, workload.target,
    )  # fmt: skip
    n = max(repeat or workload.repeat, MIN_REPEAT)
    for i in range(n):
        sides = [("ours", workload.ours), ("reference", workload.reference)]
        if i % 2:
            sides.reverse()
        for label, fn in sides:
            try:
                value = _measure(fn, quick)
            except Exception:
                result.error = f"{label}: {traceback.format_exc(limit=3)}"
                return result
            getattr(result, label).append(value)
            print(f"  {workload.name} [{label}] run {i + 1}/{n}: {value:,.1f} {workload.unit}", flush=True)
    return result


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "n/a"
    text = f"{x:,.3g}" if abs(x) < 100 else f"{x:,.0f}"
    return f"{text} {unit}".strip()


def table(results: Sequence[Result]) -> str:
    """A markdown table of medians and ratios."""
    lines = [
        "| workload | trioscheduler | reference | ref. median | ratio (>1 = better) | target |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.name} | error | {r.reference_label} | | | {r.error.splitlines()[0]} |")
            continue
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "n/a"
        target = "" if r.target is None else f">= {r.target:g}x " + ("met" if r.met else "MISSED")
        lines.append(
            f"| {r.name} | {_fmt(r.ours_median, r.unit)} | {r.reference_label} "
            f"| {_fmt(r.reference_median, r.unit)} | {ratio} | {target} |"
        )
    return "\n".join(lines)


def write_results(results: Sequence[Result], directory: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """``<timestamp>.json`` and ``<timestamp>.md`` under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    meta = {
        "time": stamp,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "node": platform.node(),
        "cpus": _cpu_count(),
        "core": _core_build(),
    }
    json_path = directory / f"{stamp}.json"
    json_path.write_text(
        json.dumps({"meta": meta, "results": [r.as_dict() for r in results]}, indent=2) + "\n"
    )
    md_path = directory / f"{stamp}.md"
    details = "\n".join(
        f"- **{r.name}**: {r.description} Samples (ours / reference): "
        f"{', '.join(_fmt(x) for x in r.ours)} / {', '.join(_fmt(x) for x in r.reference)} {r.unit}."
        for r in results
        if not r.error
    )
    md_path.write_text(
        f"# Benchmarks {stamp}\n\nPython {meta['python']} on {meta['machine']}, "
        f"{meta['cpus']} CPUs, {meta['core']} core.\n\n{table(results)}\n\n{details}\n"
    )
    return json_path, md_path


def _core_build() -> str:
    """Which build of the state machines ran: the figures differ by 1.5-2x."""
    from trioscheduler.core import compiled

    return "mypyc-compiled" if compiled() else "pure-Python"


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def alternate_builds(
    module: str, args: Sequence[str], builds: Sequence[tuple[str, str]], rounds: int, key: str
) -> None:
    """``python -m module *args`` once per build per round, the order alternating (ABBA),
    each build's ``PYTHONPATH`` its path (``-`` for none); prints each build's medians of
    the numeric fields of the child's last JSON line, and the samples of ``key``. For
    before/after comparisons of CPU per task on a loaded machine."""
    got: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in builds}
    for r in range(rounds):
        for name, path in builds if r % 2 == 0 else builds[::-1]:
            env = dict(os.environ)
            if path == "-":
                env.pop("PYTHONPATH", None)
            else:
                env["PYTHONPATH"] = path
            proc = subprocess.run(
                [sys.executable, "-m", module, *args],
                env=env, capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if not lines:
                print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            got[name].append(json.loads(lines[-1]))
    for name, samples in got.items():
        if not samples:
            continue
        keys = [k for k, v in samples[0].items() if isinstance(v, (int, float))]
        medians = {k: round(statistics.median(s[k] for s in samples), 3) for k in keys}
        print(name, json.dumps(medians), f"{key} samples:", [round(s[key], 3) for s in samples])
    print(f"load {os.getloadavg()[0]:.1f} at {time.strftime('%H:%M:%S')} UTC")


def step_tool(
    module: str, sample: Callable[[int], dict[str, Any]], key: str, argv: Sequence[str]
) -> None:
    """The command line of the round-trip step tools (``round_trip_steps``, ``_hops``,
    ``client_steps``, ``worker_steps``): ``N`` prints one sample of ``N`` round trips as
    a JSON line; ``--ab ROUNDS N NAME=PYTHONPATH ...`` alternates builds
    (``alternate_builds``), showing the samples of ``key``."""
    if argv and argv[0] == "--ab":
        builds = [(name, path) for name, _, path in (a.partition("=") for a in argv[3:])]
        alternate_builds(module, [argv[2]], builds, int(argv[1]), key)
        return
    print(json.dumps(sample(int(argv[0]) if argv else 2000)), flush=True)
    os._exit(0)  # don't wait on lingering non-daemon threads
