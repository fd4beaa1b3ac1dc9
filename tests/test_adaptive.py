"""Adaptive scaling: the pure decision under hypothesis, the shell on a real cluster."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import trioscheduler
from trioscheduler import Client, LocalCluster
from trioscheduler.core.adaptive import (
    AdaptivePolicy,
    Backlog,
    WorkerLoad,
    desired_workers,
    workers_to_close,
)

# -- the decision -----------------------------------------------------------------------

worker_loads = st.builds(
    WorkerLoad,
    address=st.integers(0, 10**6).map(lambda i: f"tcp://10.0.0.1:{i}"),
    nthreads=st.integers(1, 8),
    processing=st.integers(0, 20) | st.just(0),
    occupancy=st.floats(0, 100),
    nbytes=st.integers(0, 10**9),
    memory_limit=st.sampled_from([0, 10**9, 4 * 10**9]),
)
backlogs = st.builds(
    Backlog,
    workers=st.lists(worker_loads, max_size=12, unique_by=lambda w: w.address).map(tuple),
    waiting=st.integers(0, 10_000),
    waiting_duration=st.floats(0, 10_000),
)
policies = st.builds(
    lambda lo, extra, wait, duration: AdaptivePolicy(lo, lo + extra, wait, duration),
    st.integers(0, 5),
    st.integers(0, 10) | st.just(math.inf),
    st.integers(1, 5),
    st.floats(0.01, 60),
)


@given(policies, backlogs)
def test_a_decision_respects_the_bounds_and_closes_only_idle_workers(
    policy: AdaptivePolicy, backlog: Backlog
) -> None:
    decision = policy.step(backlog)
    planned = len(backlog.workers)
    if decision.status == "up":
        assert planned < decision.n <= policy.maximum
        assert decision.n >= policy.minimum
    elif decision.status == "down":
        idle = {w.address for w in backlog.workers if w.processing == 0}
        assert set(decision.workers) <= idle
        assert len(set(decision.workers)) == len(decision.workers)
        assert planned - len(decision.workers) >= policy.minimum
    else:
        assert decision.status == "same"


@given(policies, backlogs)
def test_no_worker_is_closed_before_wait_count_looks(policy: AdaptivePolicy, backlog: Backlog) -> None:
    """The same surplus must be seen ``wait_count`` times in a row; then it is closed."""
    decisions = [policy.step(backlog) for _ in range(policy.wait_count)]
    assert all(d.status != "down" for d in decisions[:-1])
    if decisions[0].status == "up":
        assert all(d.status == "up" for d in decisions)  # scale up is immediate, every time
    target = policy.target(backlog)
    surplus = workers_to_close(backlog, len(backlog.workers) - target)
    if surplus:
        assert decisions[-1].status == "down" and list(decisions[-1].workers) == surplus


@given(policies, st.lists(worker_loads, min_size=1, max_size=8, unique_by=lambda w: w.address))
def test_an_interrupted_surplus_starts_counting_again(
    policy: AdaptivePolicy, loads: list[WorkerLoad]
) -> None:
    idle = Backlog(tuple(WorkerLoad(w.address, w.nthreads) for w in loads))
    busy = Backlog(idle.workers, waiting=10**4, waiting_duration=10**6)
    for _ in range(policy.wait_count - 1):
        assert policy.step(idle).status != "down"
    policy.step(busy)  # work arrived: the counts start over
    for _ in range(policy.wait_count - 1):
        assert policy.step(idle).status != "down"


@given(backlogs, st.integers(0, 1000), st.floats(0, 1000), st.floats(0.01, 60))
def test_more_waiting_work_never_asks_for_fewer_workers(
    backlog: Backlog, more: int, more_duration: float, target_duration: float
) -> None:
    bigger = Backlog(
        backlog.workers, backlog.waiting + more, backlog.waiting_duration + more_duration
    )
    assert desired_workers(bigger, target_duration) >= desired_workers(backlog, target_duration)


def test_desired_workers_examples() -> None:
    assert desired_workers(Backlog(), 5) == 0  # nothing to do, nobody there
    assert desired_workers(Backlog(waiting=1, waiting_duration=0.0), 5) == 1  # someone must run it
    # 40 s of work in 10 tasks, to be done in 5 s: 8 workers; in 1 s: no more than tasks
    assert desired_workers(Backlog(waiting=10, waiting_duration=40), 5) == 8
    assert desired_workers(Backlog(waiting=10, waiting_duration=40), 1) == 10
    # workers holding 80 % of their memory: twice as many
    full = tuple(WorkerLoad(f"w{i}", nbytes=8, memory_limit=10) for i in range(3))
    assert desired_workers(Backlog(full), 5) == 6
    # idle workers holding data are not closed if the others could not hold it
    held = tuple(WorkerLoad(f"w{i}", nbytes=3, memory_limit=10) for i in range(3))
    assert workers_to_close(Backlog(held), 3) == ["w0"]


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="minimum <= maximum"):
        AdaptivePolicy(minimum=3, maximum=2)
    with pytest.raises(ValueError, match="wait_count"):
        AdaptivePolicy(wait_count=0)
    with pytest.raises(ValueError, match="target_duration"):
        desired_workers(Backlog(), 0)


# -- the shell --------------------------------------------------------------------------


def _wait_for_file(path: str, x: int) -> int:
    while not Path(path).exists():
        time.sleep(0.01)
    return x


def _until(predicate: Any, what: str, limit: float = 60.0) -> None:
    """Poll (not a timed assertion: the limit only ends a hang)."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def test_adapt_grows_with_the_backlog_and_shrinks_without_losing_data(tmp_path: Path) -> None:
    gate = tmp_path / "go"
    with LocalCluster(1, 1, memory_limit=0) as cluster, Client(cluster) as client:
        adaptive = cluster.adapt(minimum=1, maximum=3, interval="20ms", wait_count=3,
                                 target_duration="100ms")  # fmt: skip
        assert isinstance(adaptive, trioscheduler.Adaptive)
        futures = client.map(_wait_for_file, [str(gate)] * 8, range(8))
        _until(lambda: len(cluster.workers) == 3, "three workers")  # never more than maximum
        gate.touch()
        assert client.gather(futures) == list(range(8))
        _until(lambda: len(cluster.workers) == 1, "back to the minimum")
        assert len(client.nthreads()) == 1
        # the results held on closed workers were moved, not lost
        assert client.gather(futures) == list(range(8))
        assert all(v == cluster.worker_addresses for v in client.who_has(futures).values())
        ups = [d for _, d in adaptive.log if d.status == "up"]
        assert ups and max(d.n for d in ups) == 3
        adaptive.stop()
        cluster.scale(2)
        client.wait_for_workers(2)


def test_scale_up_and_scale_down(tmp_path: Path) -> None:
    with LocalCluster(1, 1, processes=False) as cluster, Client(cluster) as client:
        cluster.scale_up(3)
        assert len(cluster.workers) == 3
        cluster.scale_up(2)  # never fewer
        assert len(cluster.workers) == 3
        future = client.submit(sum, [1, 2], key="held", workers=[cluster.worker_addresses[0]])
        assert future.result() == 3
        (holder,) = client.who_has([future])["held"]
        cluster.scale_down([holder])
        assert len(cluster.workers) == 2 and holder not in cluster.worker_addresses
        (new_holder,) = client.who_has([future])["held"]
        assert new_holder != holder and future.result() == 3
        name = next(iter(cluster.workers))
        cluster.scale_down([name])  # by name too
        assert len(cluster.workers) == 1
        with pytest.raises(ValueError, match="not a worker"):
            cluster.scale_down(["tcp://nowhere:1"])
        with pytest.raises(TypeError, match="unexpected keyword"):
            cluster.adapt(minimun=1)
