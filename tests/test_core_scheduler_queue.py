"""Root-task queuing: the scheduler state ``queued`` and the saturation that governs it.

Root tasks (no inputs, or a few inputs from tiny groups) wait in ``queued`` while every
worker is saturated, and are handed out best priority first as workers get room, one
worker filled before the next (so consecutive tasks share a worker).
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from test_core_scheduler import A, B, cluster, computes, ev, finished, frees, spec, states
from trioscheduler.core.messages import (
    ClientReleasesKeys,
    GatherDep,
    RemoveWorker,
    UpdateGraph,
    WorkerStatusChange,
)
from trioscheduler.core.scheduler import SchedulerState
from trioscheduler.core.simulator import ClusterSimulator, sinks, tree_graph

TIGHT = {"worker_saturation": 1.0, "worker_backlog": 0.0}  # one root task per thread


def submit(s: SchedulerState, specs: list[Any], wanted: list[Any] | None = None) -> list[Any]:
    keys = wanted if wanted is not None else [sp.key for sp in specs]
    return s.handle(ev(UpdateGraph, "c", specs, keys))


def test_root_tasks_beyond_saturation_wait_and_go_out_by_priority() -> None:
    s = cluster((A, 1), **TIGHT)
    order = {"t-a": 3, "t-b": 0, "t-c": 2, "t-d": 1}
    eff = submit(s, [spec(k, order=o) for k, o in order.items()])
    assert computes(eff) == [(A, "t-b")]
    assert states(s) == {"t-a": "queued", "t-b": "processing", "t-c": "queued", "t-d": "queued"}
    assert list(s.queued) and not s.open
    got = []
    for key in ("t-b", "t-d", "t-c"):
        got += computes(s.handle(finished(A, key)))
    assert got == [(A, "t-d"), (A, "t-c"), (A, "t-a")]
    assert not s.queued


def test_user_priority_beats_graph_order_in_the_queue() -> None:
    s = cluster((A, 1), **TIGHT)
    submit(s, [spec("t-0", order=0), spec("t-1", order=1)])
    submit(s, [spec("t-urgent", order=5, priority=10)])
    assert computes(s.handle(finished(A, "t-0"))) == [(A, "t-urgent")]


def test_one_worker_is_filled_before_the_next() -> None:
    """Consecutive tasks (siblings of a reduction) land on one worker."""
    s = cluster((A, 2), (B, 2), **TIGHT)
    eff = submit(s, [spec(f"t-{i}", order=i) for i in range(6)])
    assert computes(eff) == [(A, "t-0"), (A, "t-1"), (B, "t-2"), (B, "t-3")]
    # A frees both slots in one batch: it gets the next two, together
    eff = s.handle(finished(A, "t-0"), finished(A, "t-1"))
    assert computes(eff) == [(A, "t-4"), (A, "t-5")]


def test_infinite_saturation_disables_queuing() -> None:
    s = cluster((A, 1), worker_saturation=math.inf)
    eff = submit(s, [spec(f"t-{i}", order=i) for i in range(4)])
    assert len(computes(eff)) == 4 and not s.queued
    assert set(states(s).values()) == {"processing"}


def test_backlog_keeps_trivial_tasks_flowing() -> None:
    """A bare saturation of 1.1 would leave a worker idle for a round trip per task; a
    worker with less than ``worker_backlog`` seconds of known work per thread takes more."""
    s = cluster((A, 1), worker_saturation=1.1, worker_backlog=0.05)
    submit(s, [spec("t-0")])
    s.handle(finished(A, "t-0", start=0.0, stop=0.001))  # t tasks take ~1 ms
    eff = submit(s, [spec(f"t-{i}", order=i) for i in range(1, 101)])
    assert 40 <= len(computes(eff)) <= 60  # ~50 ms of 1 ms tasks
    assert len(s.queued) == 100 - len(computes(eff))


def test_unknown_durations_use_the_default_estimate() -> None:
    s = cluster((A, 2), worker_saturation=1.1, worker_backlog=0.05)
    eff = submit(s, [spec(f"t-{i}", order=i) for i in range(10)])
    assert len(computes(eff)) == 3  # ceil(2 * 1.1): 0.5 s each is past the backlog


def test_released_and_cancelled_queued_tasks_leave_the_queue() -> None:
    s = cluster((A, 1), **TIGHT)
    submit(s, [spec(f"t-{i}", order=i) for i in range(3)])
    s.handle(ev(ClientReleasesKeys, "c", ["t-1", "t-2"]))
    assert "t-1" not in s.tasks and "t-2" not in s.tasks and not s.queued
    assert computes(s.handle(finished(A, "t-0"))) == []


def test_paused_workers_take_nothing_from_the_queue() -> None:
    s = cluster((A, 1), (B, 1), **TIGHT)
    submit(s, [spec(f"t-{i}", order=i) for i in range(4)])
    s.handle(ev(WorkerStatusChange, B, "paused"))
    eff = s.handle(finished(B, "t-1"))
    assert computes(eff) == [] and len(s.queued) == 2
    eff = s.handle(ev(WorkerStatusChange, B, "running"))
    assert computes(eff) == [(B, "t-2")]


def test_lost_worker_requeues_its_root_tasks_first_in_line() -> None:
    s = cluster((A, 1), (B, 1), **TIGHT)
    submit(s, [spec(f"t-{i}", order=i) for i in range(4)])
    assert states(s)["t-0"] == "processing" and s.tasks["t-0"].processing_on == A
    eff = s.handle(ev(RemoveWorker, A, reason="segfault"))
    assert states(s)["t-0"] == "queued"  # B is busy: t-0 waits, ahead of t-2 and t-3
    assert computes(s.handle(finished(B, "t-1"))) == [(B, "t-0")]
    assert computes(eff) == []


def test_tiny_dependency_group_is_queued_and_requeued_when_its_input_is_lost() -> None:
    """``f-i`` all read one ``d`` (a group of one): root-ish, so they queue; when ``d``
    is lost the queued ones wait for its recomputation, then queue again."""
    s = cluster((A, 1), (B, 1), **TIGHT)
    submit(s, [spec("d")])
    holder = s.tasks["d"].processing_on
    assert holder is not None
    s.handle(finished(holder, "d"))
    eff = submit(
        s,
        [spec(f"f-{i}", ("d",), order=i) for i in range(10)],
        ["d"] + [f"f-{i}" for i in range(10)],
    )
    assert len(computes(eff)) == 2 and len(s.queued) == 8
    s.handle(ev(RemoveWorker, holder, reason="segfault"))
    st = states(s)
    assert st["d"] == "processing" and not s.queued
    assert {st[f"f-{i}"] for i in range(10)} == {"waiting"}
    eff = s.handle(finished(s.tasks["d"].processing_on or "", "d"))
    assert len(computes(eff)) == 1 and len(s.queued) == 9


def test_a_lone_task_reading_big_data_is_not_root_ish() -> None:
    """Locality still decides for a small group with inputs (dask's group-size rule)."""
    s = cluster((A, 4), (B, 4), **TIGHT)
    submit(s, [spec("d")])
    holder = s.tasks["d"].processing_on
    assert holder is not None
    s.handle(finished(holder, "d", nbytes=10**9))
    eff = submit(s, [spec("f", ("d",))], ["d", "f"])
    assert computes(eff) == [(holder, "f")]


def test_saturation_must_be_positive() -> None:
    with pytest.raises(ValueError, match="worker_saturation"):
        SchedulerState(worker_saturation=0.0)


def test_queued_tasks_free_nothing_on_release() -> None:
    """A queued task was never sent anywhere: releasing it tells no worker."""
    s = cluster((A, 1), **TIGHT)
    submit(s, [spec("t-0"), spec("t-1", order=1)])
    eff = s.handle(ev(ClientReleasesKeys, "c", ["t-1"]))
    assert frees(eff) == []


def test_backlog_refills_in_runs_of_consecutive_tasks() -> None:
    """Hysteresis: a worker filled to its backlog takes more only once down to half of
    it, and then a run of consecutive tasks, not one task per finished task."""
    s = cluster((A, 1), worker_saturation=1.0, worker_backlog=0.01)
    submit(s, [spec("t-0")])
    s.handle(finished(A, "t-0", start=0.0, stop=0.001))  # ~1 ms each: backlog of 10
    eff = submit(s, [spec(f"t-{i}", order=i) for i in range(1, 41)])
    first = [k for _, k in computes(eff)]
    assert first == [f"t-{i}" for i in range(1, 11)]
    refills = [
        [k for _, k in computes(s.handle(finished(A, key, start=0.0, stop=0.001)))] for key in first
    ]
    assert refills[:5] == [[]] * 5  # above half the backlog: nothing
    got = [k for r in refills for k in r]
    assert got == [f"t-{i}" for i in range(11, 11 + len(got))]  # in priority order
    assert max(len(r) for r in refills) >= 5  # handed out as a run


def test_without_queuing_consecutive_root_tasks_share_a_worker() -> None:
    """dask's co-assignment: each worker takes its share of a root group, in order."""
    s = cluster((A, 2), (B, 2), worker_saturation=math.inf)
    eff = submit(s, [spec(f"t-{i}", order=i) for i in range(8)])
    assert len(computes(eff)) == 8
    by_worker: dict[str, list[str]] = {}
    for w, k in computes(eff):
        by_worker.setdefault(w, []).append(k)
    assert sorted(len(v) for v in by_worker.values()) == [4, 4]
    for keys in by_worker.values():  # each worker's share is a block of neighbours
        idx = sorted(int(k.split("-")[1]) for k in keys)
        assert idx == list(range(idx[0], idx[0] + 4))


# ------------------------------------------------------------------ both cores, simulated


@pytest.mark.parametrize("saturation", [1.0, 1.1, math.inf])
def test_tree_with_a_worker_lost_midway_settles_correctly(saturation: float) -> None:
    sim = ClusterSimulator(validate=True, worker_saturation=saturation, worker_backlog=0.0)
    addrs = [sim.add_worker(nthreads=2) for _ in range(3)]
    tasks = tree_graph(64)
    sim.submit("c", tasks, sinks(tasks))
    for _ in range(3):  # a few rounds: tasks queued, running and held
        for src, dst in sim.nonempty_queues():
            sim.deliver(src, dst, n=100)
        for addr, key in sim.running_tasks()[:4]:
            sim.finish(addr, key)
    assert saturation == math.inf or sim.scheduler.queued
    sim.lose_worker(addrs[0])
    assert not sim.settle()


@pytest.mark.parametrize(("options", "most"), [({}, 31), ({"worker_saturation": math.inf}, 4)])
def test_siblings_share_a_worker(options: dict[str, float], most: int) -> None:
    """A 64-leaf tree on 4 workers: by default queued leaves go out in runs, so most
    reductions find both inputs on one worker (measured 29 transfers for 63 reductions;
    one run per finished task, as a bare saturation does, needs 49); without queuing,
    co-assignment gives each worker a block of neighbouring leaves (3)."""
    sim = ClusterSimulator(validate=True, steal=False, **options)
    for _ in range(4):
        sim.add_worker(nthreads=2)
    tasks = tree_graph(128)
    sim.submit("c", tasks, sinks(tasks))
    gathers = 0
    obey = sim._obey

    def counting(w: Any, out: list[Any]) -> None:
        nonlocal gathers
        gathers += sum(type(i) is GatherDep for i in out)
        obey(w, out)

    sim._obey = counting  # type: ignore[method-assign]
    sim.run_to_completion()
    assert gathers <= most
    assert not sim.check_outcome()
