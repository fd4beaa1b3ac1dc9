"""The worker core when its scheduler stream is lost (issue 18): what it keeps and drops."""

from __future__ import annotations

from trioscheduler.core.messages import (
    HEARTBEAT_TIMEOUT,
    AddKeys,
    CloseWorker,
    ComputeTask,
    DeleteData,
    Execute,
    ExecuteSuccess,
    GatherDep,
    GatherDepSuccess,
    SchedulerLost,
    TaskFinished,
    ToScheduler,
)
from trioscheduler.core.worker import WorkerState

W = "w0"


def compute(key: str, deps: dict[str, list[str]] | None = None, prio: int = 0) -> ComputeTask:
    deps = deps or {}
    return ComputeTask("s", 1.0, key, f"run-{key}".encode(), list(deps), deps, {}, (prio,))


def done(key: str, stim: str = "d") -> ExecuteSuccess:
    return ExecuteSuccess(stim, 2.0, key, 10, "int", 1.5, 2.0)


def states(ws: WorkerState) -> dict[str, str]:
    return {k: ts.state for k, ts in ws.tasks.items()}


def test_lost_scheduler_keeps_values_and_cancels_work() -> None:
    ws = WorkerState(W, nthreads=1, validate=True)
    ws.handle(compute("x"))
    ws.handle(done("x"))
    # y reads x (here) and a (fetched from w1); z runs; q waits for the thread
    out = ws.handle(compute("z", prio=0), compute("y", {"x": [W], "a": ["w1"]}, prio=1),
                    compute("q", prio=2))  # fmt: skip
    assert out == [Execute("z", b"run-z"), GatherDep("w1", ["a"], 1024)]
    assert ws.handle(SchedulerLost("lost", 3.0)) == []  # nothing to delete: x is kept
    assert states(ws) == {"x": "memory", "z": "cancelled", "a": "cancelled"}
    assert ws.held() == {"x": 10}
    # what was running or fetching arrives later: dropped, and nothing new starts
    assert ws.handle(done("z", stim="z")) == [DeleteData("z")]
    assert ws.handle(GatherDepSuccess("g", 4.0, "w1", {"a": 1})) == [DeleteData("a")]
    assert states(ws) == {"x": "memory"} and ws.executing_count == 0
    assert ws.in_memory == {"x"} and ws.memory_bytes == ws.managed_bytes == 10


def test_after_rejoining_a_cancelled_task_asked_again_is_not_run_twice() -> None:
    ws = WorkerState(W, nthreads=1, validate=True)
    ws.handle(compute("z"))
    ws.handle(SchedulerLost("lost", 3.0))
    assert ws.held() == {}
    assert ws.handle(compute("z")) == []  # its thread still runs: no second Execute
    assert ws.handle(done("z", stim="z")) == [
        ToScheduler(TaskFinished("z", 2.0, W, "z", 10, "int", 1.5, 2.0))
    ]
    assert ws.held() == {"z": 10}


def test_fetched_replica_is_kept_too() -> None:
    ws = WorkerState(W, nthreads=1, validate=True)
    ws.handle(compute("y", {"a": ["w1"]}))
    out = ws.handle(GatherDepSuccess("g", 2.0, "w1", {"a": 7}))
    assert out == [ToScheduler(AddKeys("g", 2.0, W, {"a": 7})), Execute("y", b"run-y")]
    assert ws.handle(SchedulerLost("lost", 3.0)) == []
    assert states(ws) == {"a": "memory", "y": "cancelled"}
    assert ws.held() == {"a": 7}


def test_a_close_for_silence_means_rejoin_any_other_means_close() -> None:
    assert WorkerState.closing_is_loss(CloseWorker(W, f"{HEARTBEAT_TIMEOUT} 31.2s (timeout 30s)"))
    assert not WorkerState.closing_is_loss(CloseWorker(W, "retired"))
    assert not WorkerState.closing_is_loss(CloseWorker(W, "restart"))
