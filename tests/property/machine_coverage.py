"""What the cluster machine reached: table edges of both cores and event types.

An edge counts as *taken* when a task really moved along it: the cores' story logs hold
one ``(start, finish)`` entry per move, so a table function that ran but left the task
where it was (a stale recommendation) does not count. The scheduler's story also holds
``processing -> processing`` for a confirmed steal, which is not a table edge; it is
reported as the pseudo-event ``scheduler:steal-moved``.

``UNREACHABLE_*`` name the table edges no sequence of events can take, each with the
reason; every other edge is *reachable* and the long profile must take all of them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from trioscheduler.core import scheduler_transitions, worker_transitions
from trioscheduler.core.simulator import ClusterSimulator

Edge = tuple[str, str]

SCHEDULER_EDGES: frozenset[Edge] = frozenset(scheduler_transitions.TRANSITIONS)
WORKER_EDGES: frozenset[Edge] = frozenset(worker_transitions.TRANSITIONS)

UNREACHABLE_SCHEDULER: dict[Edge, str] = {}
UNREACHABLE_WORKER: dict[Edge, str] = {
    ("error", "waiting"): "the scheduler frees an erred key on its worker (FreeKeys) when it "
    "handles the TaskErred, before any later ComputeTask for that key on the same FIFO "
    "stream, so the worker has released it first; kept for a worker that would re-register "
    "with its state (none does)",
    ("error", "fetch"): "as error -> waiting: the FreeKeys always precedes an AcquireReplicas "
    "or a dependent's ComputeTask naming the key",
    ("memory", "released"): "only memory_forgotten's fallback, for a reader that attached "
    "between the forget recommendation and its application; within one drain nothing "
    "attaches to a key in memory after _detach or FreeKeys recommended forgetting it",
}


def _moves(starts: Iterable[str], finishes: Iterable[str]) -> Counter[Edge]:
    return Counter(zip(starts, finishes, strict=True))


class Tally:
    """Edges and event types summed over the runs of one test."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.scheduler: Counter[Edge] = Counter()
        self.worker: Counter[Edge] = Counter()
        self.events: Counter[str] = Counter()
        self.runs = 0

    def add_run(self, sim: ClusterSimulator) -> dict[str, int]:
        """Add one run's moves and events; returns how many distinct edges it took."""
        self.runs += 1
        log = sim.scheduler.log
        moves = _moves(log.starts, log.finishes)
        steals = moves.pop(("processing", "processing"), 0)
        if steals:
            self.events["scheduler:steal-moved"] += steals
        self.scheduler.update(moves)
        worker: Counter[Edge] = Counter()
        for w in [*sim.workers.values(), *sim.departed]:
            story = w.state._story
            worker.update(_moves(story.starts, story.finishes))
        self.worker.update(worker)
        self.events.update(sim.event_counts or {})
        if sim.scheduler.amm_dropped:  # copies the Active Memory Manager dropped
            self.events["scheduler:amm-dropped"] += sim.scheduler.amm_dropped
        return {"scheduler": len(moves), "worker": len(worker)}

    # ------------------------------------------------------------------ figures

    @staticmethod
    def _reachable(table: frozenset[Edge], unreachable: dict[Edge, str]) -> frozenset[Edge]:
        return table - unreachable.keys()

    def missed(self) -> dict[str, list[Edge]]:
        """Reachable edges never taken, per core."""
        return {
            "scheduler": sorted(
                self._reachable(SCHEDULER_EDGES, UNREACHABLE_SCHEDULER) - self.scheduler.keys()
            ),
            "worker": sorted(
                self._reachable(WORKER_EDGES, UNREACHABLE_WORKER) - self.worker.keys()
            ),
        }

    def fraction(self) -> dict[str, float]:
        out = {}
        for name, table, unreachable, taken in (
            ("scheduler", SCHEDULER_EDGES, UNREACHABLE_SCHEDULER, self.scheduler),
            ("worker", WORKER_EDGES, UNREACHABLE_WORKER, self.worker),
        ):
            reachable = self._reachable(table, unreachable)
            out[name] = len(reachable & taken.keys()) / len(reachable)
        return out

    def unknown(self) -> dict[str, list[Edge]]:
        """Moves outside the tables (a bug in this tally or in the story)."""
        return {
            "scheduler": sorted(self.scheduler.keys() - SCHEDULER_EDGES),
            "worker": sorted(self.worker.keys() - WORKER_EDGES),
        }

    def report(self) -> str:
        lines = [f"cluster machine coverage over {self.runs} runs"]
        frac = self.fraction()
        for name, table, unreachable, taken in (
            ("scheduler", SCHEDULER_EDGES, UNREACHABLE_SCHEDULER, self.scheduler),
            ("worker", WORKER_EDGES, UNREACHABLE_WORKER, self.worker),
        ):
            reachable = self._reachable(table, unreachable)
            n = len(reachable & taken.keys())
            lines.append(
                f"  {name} edges: {n}/{len(reachable)} reachable taken ({frac[name]:.0%}); "
                f"{len(unreachable)} unreachable by construction"
            )
            for edge in sorted(table):
                mark = "unreachable" if edge in unreachable else taken.get(edge, 0)
                lines.append(f"    {edge[0]:>12} -> {edge[1]:<12} {mark}")
        lines.append(f"  event types: {len(self.events)}")
        lines.extend(f"    {name:<40} {n}" for name, n in sorted(self.events.items()))
        return "\n".join(lines)


def as_dict(tally: Tally) -> dict[str, Any]:
    return {
        "runs": tally.runs,
        "fraction": tally.fraction(),
        "missed": tally.missed(),
        "events": dict(tally.events),
    }
