"""Graph shapes for the cluster simulator and the benchmarks: layers, maps, reductions."""

from __future__ import annotations

from typing import Any, Protocol

from trioscheduler.core.messages import Key
from trioscheduler.core.sim_records import ALWAYS, SimTask, task_value


class Rng(Protocol):
    """What the graph builders need of an injected ``random.Random``."""

    def sample(self, population: list[Any], k: int) -> list[Any]: ...


def layered_graph(
    n_tasks: int,
    width: int,
    rng: Rng,
    *,
    fan_in: int = 2,
    prefix: str = "t",
    nbytes: int = 1000,
) -> list[SimTask]:
    """``n_tasks`` in layers of ``width``; each task past the first layer reads
    ``fan_in`` random tasks of the layer before (so data moves between workers)."""
    tasks: list[SimTask] = []
    prev: list[Key] = []
    layer = 0
    while len(tasks) < n_tasks:
        cur: list[Key] = []
        for i in range(min(width, n_tasks - len(tasks))):
            key = f"{prefix}{layer}-{i}"
            deps = rng.sample(prev, min(fan_in, len(prev))) if prev else []
            tasks.append(SimTask(key, deps, nbytes))
            cur.append(key)
        prev = cur
        layer += 1
    return tasks


def independent_graph(n_tasks: int, *, prefix: str = "m", nbytes: int = 1000) -> list[SimTask]:
    """``n_tasks`` tasks without dependencies (a ``map``)."""
    return [SimTask(f"{prefix}-{i}", [], nbytes) for i in range(n_tasks)]


def tree_graph(
    n_tasks: int, *, fan_in: int = 2, prefix: str = "r", nbytes: int = 1000
) -> list[SimTask]:
    """A reduction tree of about ``n_tasks`` tasks: leaves, then each task combines
    ``fan_in`` neighbours of the level below (dask's tree reduction)."""
    n_leaves = max(1, n_tasks * (fan_in - 1) // fan_in)
    tasks = [SimTask(f"{prefix}0-{i}", [], nbytes) for i in range(n_leaves)]
    level = [t.key for t in tasks]
    depth = 0
    while len(level) > 1 and len(tasks) < n_tasks:
        depth += 1
        nxt: list[Key] = []
        for i in range(0, len(level), fan_in):
            key = f"{prefix}{depth}-{i // fan_in}"
            tasks.append(SimTask(key, level[i : i + fan_in], nbytes))
            nxt.append(key)
        level = nxt
    return tasks


def sinks(tasks: list[SimTask]) -> list[Key]:
    """Keys no task of ``tasks`` depends on (what a client usually holds futures for)."""
    used = {d for t in tasks for d in t.dependencies}
    return [t.key for t in tasks if t.key not in used]


# ---------------------------------------------------------------------- what a graph implies
# (the simulator's oracles ask these of the graph it was given)


def expected_value(graph: dict[Key, SimTask], values: dict[Key, int], key: Key) -> int:
    """The value ``key`` must have: the graph evaluated directly (``values`` caches)."""
    v = values.get(key)
    if v is not None:
        return v
    stack = [key]
    while stack:
        k = stack[-1]
        if k in values:
            stack.pop()
            continue
        todo = [d for d in graph[k].dependencies if d not in values]
        if todo:
            stack.extend(todo)
            continue
        stack.pop()
        values[k] = task_value(k, [values[d] for d in graph[k].dependencies])
    return values[key]


def lineage(graph: dict[Key, SimTask], key: Key) -> set[Key]:
    """``key`` and everything it depends on, transitively."""
    seen = {key}
    stack = [key]
    while stack:
        for d in graph[stack.pop()].dependencies:
            if d not in seen:
                seen.add(d)
                stack.append(d)
    return seen


def failure_flags(graph: dict[Key, SimTask]) -> dict[Key, tuple[bool, bool]]:
    """``key -> (doomed, may_fail)`` over its lineage: a task that always fails, a task
    that may fail more often than its retries allow (graph order is topological:
    dependencies are submitted first)."""
    flags: dict[Key, tuple[bool, bool]] = {}
    for k, t in graph.items():
        doomed = t.fail_attempts == ALWAYS
        may_fail = t.fail_attempts > t.retries
        for d in t.dependencies:
            dd, dm = flags[d]
            doomed = doomed or dd
            may_fail = may_fail or dm
        flags[k] = (doomed, may_fail)
    return flags
