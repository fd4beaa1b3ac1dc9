"""Where extra copies of keys go (``Client.replicate``): a pure, deterministic plan.

The shell asks the chosen workers to fetch (``AcquireReplicas``); the core learns of
each new copy from the worker's ``AddKeys`` as for any other replica.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["plan_replicas"]


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
