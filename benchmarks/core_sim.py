"""Both cores together, without I/O: the simulated cluster of ``core.simulator``.

Workloads (registered with the harness; the "reference" side is the target itself, so
the ratio reads as "times the target"):

* ``core-sim-map`` / ``core-sim-tree`` / ``core-sim-random``: tasks per second for a
  100,000-task graph on 100 simulated workers of 2 threads, from ``UpdateGraph`` until
  every task ran and every message was handled, through the scheduler core and the
  worker cores (and the simulated shells). Measured in CPU seconds of the process, so
  that a loaded shared machine skews it less; the CLI prints wall-clock rates too. Graphs: independent tasks; a binary tree
  reduction; layers of 1,000 tasks each reading 2 random tasks of the layer before
  (nearly every input crosses workers). Target: 20,000 tasks/s.
* ``core-sim-map-cores`` / ``-tree-cores`` / ``-random-cores``: the same runs, counting
  only the time spent inside the cores' ``handle`` (what the target asks: "scheduler and
  worker transitions together"); the simulated shells stand in for the I/O shells of a
  real cluster and are left out. Both figures are reported.
* ``core-sim-memory``: bytes of scheduler state per task (``tracemalloc``) after the
  100,000-task random graph was submitted to 100 workers, keys and story log included,
  events and effects dropped. Target: 1 KB (dask.distributed's documented figure).
* ``core-sim-1m`` (only with ``TRIOSCHEDULER_BENCH_LARGE=1``: minutes): 1,000,000 tasks
  on 1,000 workers to completion, tasks/s.

Run alone with a profile of the top costs::

    python -m benchmarks.core_sim [--tasks N] [--workers W] [--graph map|tree|random]
                                  [--profile] [--memory] [--million]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import random
import time
import tracemalloc
from collections.abc import Callable

from benchmarks import _harness
from trioscheduler.core import compiled
from trioscheduler.core.messages import TaskSpec, UpdateGraph
from trioscheduler.core.simulator import (
    RUN_SPEC,
    ClusterSimulator,
    SimTask,
    independent_graph,
    layered_graph,
    sinks,
    tree_graph,
)

TARGET_TASKS_PER_S = 20_000.0
TARGET_BYTES_PER_TASK = 1024.0

GRAPHS: dict[str, Callable[[int, random.Random], list[SimTask]]] = {
    "map": lambda n, rng: independent_graph(n),
    "tree": lambda n, rng: tree_graph(n),
    "random": lambda n, rng: layered_graph(n, 1000, rng, fan_in=2),
}


SCHEDULER_OPTIONS: dict[str, float] = {}
"""Extra ``SchedulerState`` arguments for every run (``--worker-saturation``)."""


def cluster(n_workers: int, nthreads: int = 2) -> ClusterSimulator:
    sim = ClusterSimulator(steal=False, **SCHEDULER_OPTIONS)
    for _ in range(n_workers):
        sim.add_worker(nthreads=nthreads)
    return sim


class _Timed:
    """A core whose ``handle`` calls are timed (``perf_counter``; the core runs on this
    one thread, so that is its CPU time unless the machine takes the CPU away)."""

    __slots__ = ("core", "spent")

    def __init__(self, core: object, spent: list[float]) -> None:
        self.core = core
        self.spent = spent

    def handle(self, *events: object) -> list[object]:
        t = time.perf_counter()
        out: list[object] = self.core.handle(*events)  # type: ignore[attr-defined]
        self.spent[0] += time.perf_counter() - t
        return out


def run(
    n_tasks: int, n_workers: int, graph: str = "random", check: bool = True, cores_only: bool = False
) -> tuple[float, float]:
    """``(tasks per wall second, tasks per CPU second)`` from submission to a quiet
    cluster (graph building not timed). CPU time is this process's, so a shared,
    loaded machine skews it less than wall time.

    ``cores_only``: the second figure counts only the time inside the scheduler's and
    the workers' ``handle`` (the state machines), not the simulated shells around them,
    which stand in for the I/O shells of a real cluster.
    """
    sim = cluster(n_workers)
    spent = [0.0]
    if cores_only:
        sim.scheduler_core = _Timed(sim.scheduler_core, spent)
        for w in sim.workers.values():
            w.core = _Timed(w.core, spent)
    tasks = GRAPHS[graph](n_tasks, random.Random(42))
    wanted = sinks(tasks)
    gc.collect()
    # The simulated client's graph (``SimTask``s, which no scheduler or worker process
    # holds) is kept out of the collector's sight, as benchmarks/wire.py does with its
    # input; the cores' own records are collected as in a real process.
    gc.freeze()
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        sim.submit("client", tasks, wanted)
        sim.run_to_completion(max_rounds=10_000_000)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        gc.unfreeze()
    if cores_only:
        cpu = spent[0]
        sim.scheduler_core = sim.scheduler_core.core
        for w in sim.workers.values():
            w.core = w.core.core
    if check:
        problems = sim.check_outcome()
        assert not problems, problems[:5]
    return len(tasks) / wall, len(tasks) / cpu


def throughput(
    n_tasks: int, n_workers: int, graph: str = "random", check: bool = True, cores_only: bool = False
) -> float:
    """Tasks per CPU second (see ``run``)."""
    return run(n_tasks, n_workers, graph, check, cores_only)[1]


def scheduler_bytes_per_task(n_tasks: int, n_workers: int, graph: str = "random") -> float:
    """Scheduler memory per task right after submission (tasks assigned, none run)."""
    sim = cluster(n_workers)
    core = sim.scheduler
    rng = random.Random(42)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tasks = GRAPHS[graph](n_tasks, rng)
        wanted = sinks(tasks)
        # what the wire would deliver: keys, dependency lists, an opaque run spec
        specs = [TaskSpec(t.key, t.dependencies, RUN_SPEC, 0, i) for i, t in enumerate(tasks)]
        del tasks
        effects = core.handle(UpdateGraph("submit", 0.0, "client", specs, wanted))
        del effects, specs, wanted
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(core.tasks) == n_tasks
    return (after - before) / n_tasks


def _size(quick: bool, full: int, small: int) -> int:
    return small if quick else full


for _graph in GRAPHS:
    _harness.register(
        f"core-sim-{_graph}",
        description=(
            f"Scheduler + worker cores in the pure simulator: 100,000-task {_graph} graph on "
            "100 workers x 2 threads, submission to completion (tasks per CPU second)."
        ),
        unit="tasks/CPU-s",
        ours=lambda quick, g=_graph: throughput(_size(quick, 100_000, 10_000), 100, g),  # type: ignore[misc]
        reference=lambda quick: TARGET_TASKS_PER_S,
        reference_label="target 20,000 tasks/s",
        target=1.0,
    )
    _harness.register(
        f"core-sim-{_graph}-cores",
        description=(
            f"As core-sim-{_graph}, counting only the time inside the two cores' handle() "
            "(tasks per second of core time; the simulated shells excluded)."
        ),
        unit="tasks/core-s",
        ours=lambda quick, g=_graph: throughput(  # type: ignore[misc]
            _size(quick, 100_000, 10_000), 100, g, cores_only=True
        ),
        reference=lambda quick: TARGET_TASKS_PER_S,
        reference_label="target 20,000 tasks/s",
        target=1.0,
    )

_harness.register(
    "core-sim-memory",
    description=(
        "Scheduler state per task (tracemalloc) after submitting a 100,000-task random "
        "graph to 100 workers; keys and story log included (B/task)."
    ),
    unit="B/task",
    ours=lambda quick: scheduler_bytes_per_task(_size(quick, 100_000, 10_000), 100),
    reference=lambda quick: TARGET_BYTES_PER_TASK,
    reference_label="target 1 KB (dask's figure)",
    higher_is_better=False,
    target=1.0,
)

if os.environ.get("TRIOSCHEDULER_BENCH_LARGE"):
    _harness.register(
        "core-sim-1m",
        description="1,000,000-task random graph on 1,000 simulated workers to completion (tasks/s).",
        unit="tasks/CPU-s",
        ours=lambda quick: throughput(
            _size(quick, 1_000_000, 100_000), 1000, "random", check=False
        ),
        reference=lambda quick: TARGET_TASKS_PER_S,
        reference_label="target 20,000 tasks/s",
        target=1.0,
    )


def profile(n_tasks: int, n_workers: int, graph: str, top: int = 25) -> None:
    """Print the functions that cost the most time, as % of the run."""
    prof = cProfile.Profile()
    prof.enable()
    throughput(n_tasks, n_workers, graph, check=False)
    prof.disable()
    stats = pstats.Stats(prof)
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]  # type: ignore[attr-defined]
    print(f"top {top} by own time (profiled total {total:.2f}s):")
    for (path, line, name), (_cc, ncalls, tt, ct, _callers) in rows:
        short = path.split("/src/")[-1].split("/benchmarks/")[-1]
        print(
            f"  {100 * tt / total:5.1f}% own {100 * ct / total:5.1f}% cum {ncalls:>9} calls  {short}:{line}({name})"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.core_sim", description=__doc__)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--graph", choices=sorted(GRAPHS), action="append")
    parser.add_argument("--profile", action="store_true", help="cProfile the run: top costs")
    parser.add_argument("--memory", action="store_true", help="scheduler bytes per task")
    parser.add_argument("--million", action="store_true", help="1,000,000 tasks on 1,000 workers")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per graph; the best is reported last"
    )
    parser.add_argument(
        "--worker-saturation",
        type=float,
        help="SchedulerState(worker_saturation=...); inf: no queuing",
    )
    parser.add_argument("--worker-backlog", type=float, help="SchedulerState(worker_backlog=...)")
    parser.add_argument(
        "--cores", action="store_true", help="also time the cores alone (a second run per repeat)"
    )
    args = parser.parse_args(argv)
    if args.worker_saturation is not None:
        SCHEDULER_OPTIONS["worker_saturation"] = args.worker_saturation
    if args.worker_backlog is not None:
        SCHEDULER_OPTIONS["worker_backlog"] = args.worker_backlog
    graphs = args.graph or sorted(GRAPHS)
    print(f"core: {'mypyc-compiled' if compiled() else 'pure Python'}", flush=True)
    if args.million:
        args.tasks, args.workers = 1_000_000, 1000
    for g in graphs:
        rates: list[float] = []
        core_rates: list[float] = []
        for _ in range(max(1, args.repeat)):
            wall, cpu = run(args.tasks, args.workers, g, check=not args.million)
            rates.append(cpu)
            line = (
                f"{g:>7}: {args.tasks:,} tasks on {args.workers} workers: "
                f"{cpu:,.0f} tasks/CPU-s ({wall:,.0f} tasks/wall-s)"
            )
            if args.cores:
                core_rates.append(run(args.tasks, args.workers, g, False, cores_only=True)[1])
                line += f"; cores alone {core_rates[-1]:,.0f} tasks/core-s"
            print(line, flush=True)
        if len(rates) > 1:
            best = f"{g:>7}: best of {len(rates)}: {max(rates):,.0f} tasks/CPU-s"
            if core_rates:
                best += f"; cores alone {max(core_rates):,.0f} tasks/core-s"
            print(best, flush=True)
        if args.profile:
            profile(min(args.tasks, 30_000), args.workers, g)
    if args.memory:
        b = scheduler_bytes_per_task(args.tasks, args.workers)
        print(f"scheduler state: {b:,.0f} B/task ({args.tasks:,} tasks, {args.workers} workers)")


if __name__ == "__main__":
    main()
