"""A client in the scheduler's own trio run is fed inside its sends (server.client_delivery):
its graph reaches the scheduler before ``submit`` returns, and what it sends while the
scheduler is busy feeding waits its turn, in order."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from trioscheduler import Client, Scheduler, SchedulerPlugin, Worker
from trioscheduler.core import messages as m
from trioscheduler.core.scheduler_client_events import GRAPH_FIRST_MAX, graph_first

TIMEOUT = 30


def inc(x: int) -> int:
    return x + 1


@asynccontextmanager
async def _cluster(name: str) -> AsyncIterator[tuple[Scheduler, Client]]:
    """A scheduler, a worker and an asynchronous client, all in this trio run."""
    with trio.fail_after(TIMEOUT):
        async with (
            Scheduler(f"inproc://test-client-delivery-{os.getpid()}-{name}", validate=True) as s,
            Worker(s.address, nthreads=1, memory_limit=0),
            Client(s.address, asynchronous=True) as c,
        ):
            await c.wait_for_workers(1)
            yield s, c


async def test_a_graph_of_a_client_in_the_schedulers_run_is_fed_before_submit_returns() -> None:
    async with _cluster("graph") as (s, c):
        fut = c.submit(inc, 1, key="inc-1")
        assert "inc-1" in s.state.tasks  # no schedule point in between
        assert await fut == 2
        fut.release()
        again = c.submit(inc, 1, key="inc-1")  # the release went first, then the graph
        assert await again == 2


class _ResubmitOnMemory(SchedulerPlugin):
    """When ``trigger`` is in memory, inside the scheduler's feed: drop ``x`` and ask for
    it again, and ask for one more key."""

    def __init__(self, scheduler: Scheduler, client: Client, held: dict[str, Any]) -> None:
        self.scheduler = scheduler
        self.client = client
        self.held = held

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if key == "trigger" and finish == "memory":
            self.held.pop("x").release()
            self.held["x-again"] = self.client.submit(inc, 1, key="x")
            self.held["z"] = self.client.submit(inc, 10, key="z")
            self.held["z fed inside the hook"] = "z" in self.scheduler.state.tasks


async def test_what_a_client_sends_while_the_scheduler_feeds_is_fed_after_in_order() -> None:
    """A scheduler plugin's hook runs inside the scheduler's feed. A client that sends from
    there is not fed re-entrantly (in the middle of routing the feed's effects) but right
    after, in the order it sent: the release of ``x`` before the graph asking for it again,
    so ``x`` is kept and every future finishes."""
    async with _cluster("order") as (s, c):
        held: dict[str, Any] = {"x": c.submit(inc, 1, key="x")}
        assert await held["x"] == 2
        await s.plugins.add(_ResubmitOnMemory(s, c, held), "resubmit", False, None)
        assert await c.submit(inc, 2, key="trigger") == 3
        assert held["z fed inside the hook"] is False
        assert await held["x-again"] == 2
        assert await held["z"] == 11
        assert s.state.tasks["x"].state == "memory"


def _release(*keys: str) -> m.ClientReleasesKeys:
    return m.ClientReleasesKeys("release", 0.0, "client-1", list(keys))


def _graph(*tasks: tuple[str, list[str]]) -> m.UpdateGraph:
    specs = [m.TaskSpec(key, deps, b"") for key, deps in tasks]
    return m.UpdateGraph("graph", 0.0, "client-1", specs, [key for key, _ in tasks])


def test_a_small_graph_unrelated_to_the_release_before_it_is_fed_first() -> None:
    """``submit(...).result()`` in a loop: the next task goes to a worker before the
    scheduler frees the last one's key (``core.scheduler_client_events.graph_first``)."""
    release, graph = _release("a"), _graph(("b", []))
    msgs: list[Any] = [release, graph]
    graph_first(msgs)
    assert msgs == [graph, release]


def test_the_order_stays_where_it_decides_what_the_scheduler_holds() -> None:
    cases = [
        [_release("a"), _graph(("a", []))],  # released and submitted again
        [_release("a"), _graph(("b", ["a"]))],  # a new task needs the released key
        # wants x and computes no x: x's lineage (the scheduler's) may need a
        [_release("a"), m.UpdateGraph("g", 0.0, "client-1", [m.TaskSpec("b", [], b"")], ["b", "x"])],
        [_release("a"), _graph(*[(f"k{i}", []) for i in range(GRAPH_FIRST_MAX + 1)])],  # big
        [_graph(("b", [])), _release("a")],  # already graph first
    ]
    for msgs in cases:
        before = list(msgs)
        graph_first(msgs)
        assert msgs == before
