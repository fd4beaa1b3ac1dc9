"""Spill, unspill and pause: the worker core's memory decisions as instruction lists."""

from __future__ import annotations

from typing import Any

from trioscheduler.core import memory_policy as mp
from trioscheduler.core.messages import (
    ComputeTask,
    DeleteData,
    Execute,
    ExecuteSuccess,
    FreeKeys,
    MemoryMeasured,
    ReleaseWorkerData,
    Spill,
    SpillFailed,
    SpillWritten,
    TaskFinished,
    ToScheduler,
    Unspill,
    WorkerStatusChange,
    WorkerUpdateData,
)
from trioscheduler.core.worker import WorkerState

W = "w0"


def ws_(**kw: Any) -> WorkerState:
    kw.setdefault("validate", True)
    kw.setdefault("memory_limit", 1000)
    return WorkerState(W, **kw)


def compute(key: Any, deps: list[Any] = (), prio: tuple[Any, ...] = (0,)) -> ComputeTask:  # type: ignore[assignment]
    return ComputeTask("c", 1.0, key, b"f", list(deps), {}, {}, prio)


def scatter(**data: int) -> WorkerUpdateData:
    return WorkerUpdateData("u", 1.0, dict(data))


def measured(pm: int) -> MemoryMeasured:
    return MemoryMeasured("m", 5.0, pm)


def written(*keys: Any) -> SpillWritten:
    return SpillWritten("sw", 1.5, list(keys))


# ----------------------------------------------------------------------------- the pure policy


def test_thresholds_from_fractions() -> None:
    th = mp.MemoryThresholds.from_fractions(1000, 0.6, 0.7, 0.8)
    assert (th.target, th.spill, th.pause, th.write_ahead) == (600, 700, 800, 100)
    assert mp.spill_goal(th) == 500  # the target less the write-ahead allowance
    off = mp.MemoryThresholds.from_fractions(0, 0.6, 0.7, 0.8)
    assert (off.target, off.spill, off.pause, off.write_ahead) == (None, None, None, None)
    assert mp.MemoryThresholds.from_fractions(1000, 0.6, 0.7, 0.8, None).write_ahead is None
    assert mp.MemoryThresholds.from_fractions(1000, None, 0.7, None).target is None


def test_policy_numbers() -> None:
    th = mp.MemoryThresholds.from_fractions(1000, 0.6, 0.7, 0.8)
    assert mp.target_excess(500, th) == 0 and mp.target_excess(650, th) == 150
    sync = mp.MemoryThresholds.from_fractions(1000, 0.6, 0.7, 0.8, None)  # no write-ahead
    assert mp.spill_goal(sync) == 600 and mp.target_excess(650, sync) == 50
    assert mp.spill_goal(mp.MemoryThresholds.from_fractions(1000, None, 0.7, 0.8)) is None
    assert mp.process_excess(700, th) == 0 and mp.process_excess(750, th) == 150
    assert not mp.should_pause(800, th) and mp.should_pause(801, th)
    assert not mp.writes_behind(100, th) and mp.writes_behind(101, th)
    assert not mp.writes_behind(10**9, mp.MemoryThresholds.from_fractions(0, 0.6, 0.7, 0.8))
    no_target = mp.MemoryThresholds.from_fractions(1000, None, 0.7, 0.8)
    assert mp.process_excess(750, no_target) == 50
    lru = [("a", 10), ("b", 20), ("c", 30)]
    assert mp.choose_spill(iter(lru), 25) == ["a", "b"]
    assert mp.choose_spill(iter(lru), 25, exclude={"a"}) == ["b", "c"]
    assert mp.choose_spill(iter(lru), 1000) == ["a", "b", "c"]
    assert mp.choose_spill(iter(lru), 0) == []


# ----------------------------------------------------------------------------- spilling


def test_spill_at_target_in_lru_order() -> None:
    """1000-byte limit: target 600 less the write-ahead allowance of 100, so spilling
    aims at 500 bytes in memory (what is being written still holds RAM)."""
    ws = ws_()
    assert ws.handle(scatter(a=200, b=200, c=100)) == []  # 500 is not above the goal
    assert ws.handle(scatter(d=100)) == [Spill("a")]
    assert ws.in_memory == {"b", "c", "d"} and ws.spilled == {"a"}
    assert (ws.memory_bytes, ws.spilled_bytes, ws.managed_bytes) == (400, 200, 600)
    # one big value pushes out several, oldest first
    assert ws.handle(scatter(e=350)) == [Spill("b"), Spill("c")]
    assert ws.memory_bytes == 450


def test_reading_a_key_makes_it_recent() -> None:
    ws = ws_(nthreads=1)
    ws.handle(scatter(a=200, b=200, c=50))
    ws.handle(compute("x", ["a"]))  # a is read: now the most recent
    out = ws.handle(ExecuteSuccess("d", 2.0, "x", 100))
    assert out == [ToScheduler(TaskFinished("d", 2.0, W, "x", 100)), Spill("b")]


def test_unspill_before_execute() -> None:
    ws = ws_()
    ws.handle(scatter(a=250, b=250))
    assert ws.handle(scatter(c=100)) == [Spill("a")]
    out = ws.handle(compute("x", ["a"]))
    # a comes back (its write, the only one behind, is dropped: x need not wait for it) (and is not pushed out again for x); b is spilled to make room
    assert out == [Unspill("a"), Execute("x", b"f"), Spill("b")]
    assert ws.spilled == {"b"} and ws.in_memory == {"a", "c"}


def test_no_limit_no_spill() -> None:
    ws = ws_(memory_limit=0)
    assert ws.handle(scatter(a=10**12)) == []
    assert ws.handle(measured(10**13)) == []


def test_free_spilled_key() -> None:
    ws = ws_()
    ws.handle(scatter(a=500, b=200))
    assert ws.spilled == {"a"}
    assert ws.handle(FreeKeys("f", 2.0, ["a"])) == [
        DeleteData("a"),
        ToScheduler(ReleaseWorkerData("f", 2.0, ws.address, ["a"], 1), lazy=True),
    ]
    assert ws.spilled_bytes == 0 and ws.managed_bytes == 200


def test_spill_failed_keeps_key_and_never_retries() -> None:
    ws = ws_()
    ws.handle(scatter(a=400, b=300))
    assert ws.spilled == {"a"}
    # a cannot be pickled: back in memory for good; the next one goes instead
    assert ws.handle(SpillFailed("sf", 2.0, "a", "unpicklable")) == [Spill("b")]
    assert ws.in_memory == {"a"} and not ws.tasks["a"].spillable
    assert ws.handle(scatter(c=300)) == [Spill("c")]
    assert ws.handle(measured(990)) == [
        ToScheduler(WorkerStatusChange("m", 5.0, W, "paused"))
    ]  # nothing spillable left: only pausing helps
    assert ws.in_memory == {"a"}


def test_spill_on_process_memory() -> None:
    ws = ws_()
    ws.handle(scatter(a=100, b=100, c=100))
    assert ws.handle(measured(700)) == []  # at the spill threshold, not above
    # 750 is 150 above target: a and b go
    assert ws.handle(measured(750)) == [Spill("a"), Spill("b")]


def test_pause_and_unpause() -> None:
    ws = ws_(nthreads=1)
    ws.handle(compute("x"))
    out = ws.handle(measured(850))
    assert out == [ToScheduler(WorkerStatusChange("m", 5.0, W, "paused"))]
    assert ws.status == "paused"
    # nothing starts while paused, even when a slot frees up
    assert ws.handle(compute("y")) == []
    assert ws.handle(ExecuteSuccess("d", 6.0, "x", 1)) == [
        ToScheduler(TaskFinished("d", 6.0, W, "x", 1))
    ]
    # still above pause; above spill too, so the one value goes to disk
    assert ws.handle(measured(820)) == [Spill("x")]
    out = ws.handle(measured(500))
    assert out == [ToScheduler(WorkerStatusChange("m", 5.0, W, "running")), Execute("y", b"f")]
    assert ws.status == "running"


def test_paused_worker_fetches_nothing() -> None:
    ws = ws_()
    ws.handle(measured(900))
    out = ws.handle(ComputeTask("c", 1.0, "y", b"f", ["a"], {"a": ["w1"]}, {"a": 5}, (0,)))
    assert out == []
    assert ws.tasks["a"].state == "fetch"
    out = ws.handle(measured(100))
    assert out[-1].__class__.__name__ == "GatherDep"


# ----------------------------------------------------------------------------- consumers first


def test_above_target_tasks_reading_data_start_before_new_root_tasks() -> None:
    """With more data held than the target, a ready task that reads data (and lets it be
    released) starts before a root task of better priority, which would add data."""
    ws = ws_(nthreads=1)
    ws.handle(scatter(a=300, b=400))  # 700 held: above the 600 target (``a`` spilled)
    ws.handle(written("a"))
    ws.handle(compute("blocker", prio=(0,)))  # takes the thread
    ws.handle(compute("root", prio=(1,)), compute("use-b", ["b"], prio=(5,)))
    out = ws.handle(ExecuteSuccess("e", 2.0, "blocker", 10, "int", 1.0, 2.0))
    assert Execute("use-b", b"f") in out and Execute("root", b"f") not in out


def test_below_target_priority_decides() -> None:
    ws = ws_(nthreads=1)
    ws.handle(scatter(b=100))
    ws.handle(compute("blocker", prio=(0,)))
    ws.handle(compute("root", prio=(1,)), compute("use-b", ["b"], prio=(5,)))
    out = ws.handle(ExecuteSuccess("e", 2.0, "blocker", 10, "int", 1.0, 2.0))
    assert Execute("root", b"f") in out and Execute("use-b", b"f") not in out


# ----------------------------------------------------------------------------- write-ahead


def test_no_task_starts_while_spill_writes_are_behind() -> None:
    """1000-byte limit: write-ahead 100. A spilled 250 bytes still being written holds a
    ready task back (it stays ``ready``); ``SpillWritten`` lets it start."""
    ws = ws_(nthreads=1)
    assert ws.handle(scatter(a=250, b=250)) == []
    assert ws.handle(scatter(c=100)) == [Spill("a")]
    assert ws.writing == {"a": 250} and ws.writing_bytes == 250
    assert ws.handle(compute("x")) == []
    assert ws.tasks["x"].state == "ready" and not ws.executing
    out = ws.handle(written("a"))
    assert out == [Execute("x", b"f")]
    assert ws.writing == {} and ws.writing_bytes == 0
    assert ws.spilled == {"a"} and ws.spilled_bytes == 250


def test_writes_within_the_write_ahead_do_not_hold_tasks_back() -> None:
    ws = ws_(nthreads=1)
    ws.handle(scatter(a=80, b=400))
    assert ws.handle(scatter(c=50)) == [Spill("a")]  # 530 > 500: 80 bytes to write
    assert ws.writing_bytes == 80
    assert ws.handle(compute("x")) == [Execute("x", b"f")]


def test_write_ahead_off_without_a_limit_or_threshold() -> None:
    ws = ws_(nthreads=1, write_ahead=None)
    ws.handle(scatter(a=300, b=300))
    assert ws.handle(scatter(c=100)) == [Spill("a")]
    assert ws.writing_bytes == 300  # still booked, but nothing waits for it
    assert ws.handle(compute("x")) == [Execute("x", b"f")]


def test_a_task_started_in_the_same_batch_stops_the_next_once_writes_are_behind() -> None:
    """Two free threads. Starting ``x`` brings its input ``a`` back (its write is dropped)
    and pushes 400 bytes of ``b`` out: ``y`` waits for that write."""
    ws = ws_(nthreads=2)
    ws.handle(scatter(a=100, b=400))
    out = ws.handle(compute("x", ["a"], prio=(0,)), compute("y", prio=(1,)), scatter(c=100))
    assert out == [Spill("a"), Unspill("a"), Execute("x", b"f"), Spill("b")], out
    assert ws.tasks["y"].state == "ready" and ws.writing == {"b": 400}
    assert ws.handle(written("b")) == [Execute("y", b"f")]


def test_a_task_reading_a_key_being_written_starts_and_ends_that_write() -> None:
    """Starting ``x`` brings its input ``a`` back, which ends ``a``'s pending write: ``x``
    does not wait for ``a`` to reach the disk only to read it back."""
    ws = ws_(nthreads=1)
    ws.handle(scatter(a=250, b=250))
    assert ws.handle(scatter(c=100)) == [Spill("a")]
    assert ws.handle(compute("x", ["a"])) == [Unspill("a"), Execute("x", b"f"), Spill("b")]
    assert ws.writing == {"b": 250} and ws.writing_bytes == 250  # a's write is gone
    assert ws.handle(written("a")) == []  # a late report of the dropped write: ignored
    assert ws.writing == {"b": 250} and ws.in_memory == {"a", "c"}
    ws.handle(ExecuteSuccess("d", 2.0, "x", 10))
    assert ws.handle(compute("y")) == []  # b's 250 bytes are still behind
    assert ws.handle(written("b")) == [Execute("y", b"f")]
    assert ws.writing_bytes == 0 and ws.spilled == {"b"}


def test_a_task_waits_for_writes_other_than_its_inputs() -> None:
    ws = ws_(nthreads=1)
    ws.handle(scatter(a=150, b=150, c=150))
    assert ws.handle(scatter(d=250)) == [Spill("a"), Spill("b")]
    assert ws.writing_bytes == 300
    # starting x would end a's write, but b's 150 bytes would still be behind
    assert ws.handle(compute("x", ["a"])) == []
    assert ws.handle(written("b")) == [Unspill("a"), Execute("x", b"f"), Spill("c")]
    assert ws.writing == {"c": 150}


def test_deleting_a_key_being_written_ends_its_write() -> None:
    ws = ws_(nthreads=1)
    ws.handle(scatter(a=250, b=250))
    assert ws.handle(scatter(c=100)) == [Spill("a")]
    ws.handle(compute("x"))
    out = ws.handle(FreeKeys("f", 2.0, ["a"]))
    assert DeleteData("a") in out and Execute("x", b"f") in out
    assert ws.writing == {} and ws.writing_bytes == 0
    assert (ws.spilled_bytes, ws.managed_bytes) == (0, 350)


def test_new_value_for_a_key_being_written_ends_its_write() -> None:
    ws = ws_(nthreads=1)
    ws.handle(scatter(a=250, b=250))
    assert ws.handle(scatter(c=100)) == [Spill("a")]
    ws.handle(compute("x"))
    out = ws.handle(scatter(a=50))  # scattered again: the shell holds the new value in RAM
    assert out == [Execute("x", b"f")]
    assert ws.in_memory == {"a", "b", "c"} and ws.writing == {} and ws.writing_bytes == 0
    assert (ws.memory_bytes, ws.spilled_bytes) == (400, 0)


def test_failed_write_ends_it() -> None:
    ws = ws_(nthreads=1)
    ws.handle(scatter(a=250, b=250))
    assert ws.handle(scatter(c=100)) == [Spill("a")]
    ws.handle(compute("x"))
    # a cannot be written: back in RAM for good, b goes instead (a new write, 250 behind)
    assert ws.handle(SpillFailed("sf", 2.0, "a", "disk full")) == [Spill("b")]
    assert ws.writing == {"b": 250} and ws.tasks["x"].state == "ready"
    assert ws.handle(written("b")) == [Execute("x", b"f")]
    assert ws.writing_bytes == 0 and ws.spilled == {"b"}
