"""Where copies of keys go, and which go away: pure, deterministic plans.

``plan_replicas`` (``Client.replicate``) and ``plan_rebalance`` pick workers to fetch
copies: the shell sends them ``AcquireReplicas`` and the core learns of each new copy
from the worker's ``AddKeys``, as for any replica. ``reduce_replicas`` is the Active
Memory Manager's default policy (dask's ReduceReplicas): copies beyond what running
tasks need are dropped; the scheduler core runs it on its ticks
(``scheduler_retirement.amm_tick``) and keeps at least one copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trioscheduler.core.scheduler import SchedulerState

__all__ = ["plan_rebalance", "plan_replicas", "reduce_replicas"]


def plan_replicas(
    holders: Mapping[Any, Iterable[str]],
    candidates: list[str],
    n: int,
    load: Mapping[str, int] | None = None,
) -> dict[str, list[Any]]:
    """``{worker: [keys to fetch]}`` so that each key of ``holders`` (key -> workers
    holding it) ends with ``n`` copies among ``candidates`` (fewer if there are fewer).

    New copies go to the candidates holding the fewest bytes so far (``load``), ties
    broken by address, so one call never piles every copy onto one worker.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    load = dict(load or {})
    for w in candidates:
        load.setdefault(w, 0)
    plan: dict[str, list[Any]] = {}
    for key, who in holders.items():
        have = set(who)
        missing = n - len(have & set(candidates))
        if missing <= 0:
            continue
        free = sorted((w for w in candidates if w not in have), key=lambda w: (load[w], w))
        for w in free[:missing]:
            plan.setdefault(w, []).append(key)
            load[w] += 1
    return plan


def reduce_replicas(state: SchedulerState) -> dict[str, list[Any]]:
    """``{worker: [keys whose copy there is not needed]}``.

    A key keeps the copies on workers where a dependent runs now or will run (it reads
    the local copy), and at least one; the others go: from paused or retiring workers
    first (as dask's), then the fullest. One copy stays on a running worker if one
    holds it, so that a retirement does not copy back what was just dropped (dask's
    guard against that ping-pong).
    """
    drop: dict[str, list[Any]] = {}
    workers = state.workers
    tasks = state.tasks
    for key in state.replicated:  # only keys with two copies or more (not every task)
        ts = tasks[key]
        if ts.state != "memory" or len(ts.who_has) < 2:
            continue
        needed = {
            tasks[d].processing_on
            for d in ts.dependents
            if d in tasks and tasks[d].processing_on is not None
        }
        holders = sorted(
            (w for w in ts.who_has if w in workers),
            key=lambda w: (w in needed, workers[w].status == "running", -workers[w].nbytes, w),
        )
        keep = max(1, len(needed & set(holders)))
        going = [w for w in holders[: len(holders) - keep] if w not in needed]
        running = [w for w in going if workers[w].status == "running"]
        if running and len(running) == sum(workers[w].status == "running" for w in holders):
            going.remove(running[-1])  # the emptiest running holder keeps its copy
        for w in going:
            drop.setdefault(w, []).append(key)
    return drop


def plan_rebalance(
    state: SchedulerState, keys: Iterable[Any] | None, workers: list[str]
) -> list[tuple[Any, str, str]]:
    """``[(key, sender, receiver), ...]`` moving bytes from workers above the mean to
    workers below it (among ``workers``), largest keys first, while a move narrows the
    gap; only keys in ``keys`` if given."""
    if len(workers) < 2:
        return []
    wanted = None if keys is None else set(keys)
    load = {w: state.workers[w].nbytes for w in workers}
    mean = sum(load.values()) / len(load)
    moves: list[tuple[Any, str, str]] = []
    for sender in sorted(workers, key=lambda w: (-load[w], w)):
        if load[sender] <= mean:
            break
        candidates = []
        for k in state.workers[sender].has_what:
            ts = state.tasks.get(k)
            if ts is None or ts.state != "memory" or (wanted is not None and k not in wanted):
                continue
            candidates.append((ts.nbytes, k))
        candidates.sort(key=lambda c: -c[0])
        for nbytes, k in candidates:
            if load[sender] - nbytes < mean - nbytes / 2 or nbytes == 0:
                continue
            who = state.tasks[k].who_has
            receivers = sorted((w for w in workers if w not in who), key=lambda w: (load[w], w))
            if not receivers or load[receivers[0]] + nbytes > mean + nbytes / 2:
                continue
            receiver = receivers[0]
            moves.append((k, sender, receiver))
            load[sender] -= nbytes
            load[receiver] += nbytes
            if load[sender] <= mean:
                break
    return moves
