"""``graph_first`` only swaps a release and a graph that commute: fed in either order,
the scheduler core ends holding the same tasks, in the same states, wanted by the same
clients, with the same copies, and starts the same tasks.

Hypothesis draws a computed graph (some keys in memory, some released after use), a
release of some of the client's keys and a small graph of new tasks that depend on keys
the client holds (as a client's futures do) and may want an old key too; where
``graph_first`` swaps the pair, both orders are fed to identical states.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from trioscheduler.core.messages import (
    AddClient,
    AddWorker,
    ClientReleasesKeys,
    ComputeTask,
    FreeKeys,
    TaskFinished,
    TaskSpec,
    ToWorker,
    UpdateGraph,
)
from trioscheduler.core.scheduler import SchedulerState
from trioscheduler.core.scheduler_client_events import graph_first

WORKERS = ("tcp://a", "tcp://b")
CLIENT = "client-1"


class _Feed:
    """One scheduler state and a numbered event stream (both runs number alike)."""

    def __init__(self) -> None:
        self.s = SchedulerState(validate=True)
        self.n = 0
        self.effects: list[Any] = []
        for addr in WORKERS:
            self.handle(AddWorker, addr, 1)
        self.handle(AddClient, CLIENT)

    def handle(self, cls: type, *args: Any) -> list[Any]:
        self.n += 1
        effects = self.s.handle(cls(f"{cls.__name__}-{self.n}", float(self.n), *args))
        self.effects += effects
        return effects

    def run_all(self, effects: list[Any]) -> None:
        """Finish every task started, and what that starts, until nothing runs."""
        todo = [e for e in effects if isinstance(e, ToWorker) and type(e.msg) is ComputeTask]
        while todo:
            e = todo.pop(0)
            out = self.handle(TaskFinished, e.worker, e.msg.key, 8, "int")
            todo += [o for o in out if isinstance(o, ToWorker) and type(o.msg) is ComputeTask]

    def outcome(self) -> dict[str, Any]:
        s = self.s
        return {
            "states": {k: ts.state for k, ts in s.tasks.items()},
            "wanted": sorted(map(str, s.clients[CLIENT].wants)),
            "copies": {k: sorted(map(str, ts.who_has)) for k, ts in s.tasks.items()},
        }


def _started(effects: list[Any]) -> list[str]:
    return sorted(
        e.msg.key for e in effects if isinstance(e, ToWorker) and type(e.msg) is ComputeTask
    )


def _freed(effects: list[Any]) -> list[tuple[str, str]]:
    return sorted(
        (e.worker, k) for e in effects if isinstance(e, ToWorker) and type(e.msg) is FreeKeys
        for k in e.msg.keys
    )  # fmt: skip


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[tuple[str, list[str]]], list[str], list[str], Any]:
    n_old = draw(st.integers(1, 5))
    old = [f"old-{i}" for i in range(n_old)]
    old_graph = [(k, draw(st.lists(st.sampled_from(old[:i]), unique=True)) if i else [])
                 for i, k in enumerate(old)]  # fmt: skip
    wanted = draw(st.lists(st.sampled_from(old), min_size=1, unique=True))
    released = draw(st.lists(st.sampled_from(wanted), min_size=1, unique=True))
    held = [k for k in wanted if k not in released]  # what new tasks can name
    n_new = draw(st.integers(1, 3))
    new: list[tuple[str, list[str]]] = []
    for i in range(n_new):
        pool = held + [k for k, _ in new]
        if not pool:
            new.append((f"new-{i}", []))
            continue
        new.append((f"new-{i}", draw(st.lists(st.sampled_from(pool), max_size=2, unique=True))))
    also = draw(st.lists(st.sampled_from(old), max_size=1))  # the graph wants an old key too
    return old_graph, wanted, released, (new, also)


def _prepare(old_graph: list[tuple[str, list[str]]], wanted: list[str]) -> _Feed:
    f = _Feed()
    specs = [TaskSpec(k, deps, f"run-{k}".encode()) for k, deps in old_graph]
    f.run_all(f.handle(UpdateGraph, CLIENT, specs, wanted))
    f.effects = []
    return f


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_a_swapped_release_and_graph_leave_the_scheduler_as_in_order(
    scenario: tuple[list[tuple[str, list[str]]], list[str], list[str], Any],
) -> None:
    old_graph, wanted, released, (new, also) = scenario
    specs = [TaskSpec(k, deps, f"run-{k}".encode()) for k, deps in new]
    keys = [k for k, _ in new] + also
    msgs: list[Any] = [("release", released), ("graph", specs, keys)]
    probe: list[Any] = [
        ClientReleasesKeys("r", 0.0, CLIENT, released),
        UpdateGraph("g", 0.0, CLIENT, specs, keys),
    ]
    graph_first(probe)
    if type(probe[0]) is ClientReleasesKeys:
        assert also  # (only a graph wanting a key it does not compute keeps the order here)
        return  # kept in order: nothing to compare
    outcomes = []
    for order in (msgs, msgs[::-1]):
        f = _prepare(old_graph, wanted)
        for msg in order:
            if msg[0] == "release":
                f.handle(ClientReleasesKeys, CLIENT, list(msg[1]))
            else:
                f.handle(UpdateGraph, CLIENT, list(msg[1]), list(msg[2]))
        outcomes.append((f.outcome(), _started(f.effects), _freed(f.effects)))
    in_order, swapped = outcomes
    assert swapped[0] == in_order[0]
    assert swapped[1] == in_order[1]  # the same tasks start (a worker each: placement's)
    assert swapped[2] == in_order[2]
