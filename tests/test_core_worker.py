"""The worker core: execution, fetching, stealing, cancellation, as instruction lists."""

from __future__ import annotations

from typing import Any

import pytest

from trioscheduler.core.errors import InvalidTransition
from trioscheduler.core.messages import (
    AcquireReplicas,
    AddKeys,
    ComputeTask,
    DeleteData,
    Execute,
    ExecuteFailure,
    ExecuteSuccess,
    FreeKeys,
    GatherDep,
    GatherDepFailure,
    GatherDepSuccess,
    LongRunning,
    MissingData,
    RefreshWhoHas,
    ReleaseWorkerData,
    Reschedule,
    RescheduleEvent,
    SecedeEvent,
    StealRequest,
    StealResponse,
    TaskErred,
    TaskFinished,
    ToScheduler,
    WorkerUpdateData,
)
from trioscheduler.core.worker import WorkerState
from trioscheduler.core.worker_transitions import TRANSITIONS, transition

W = "w0"


def ws_(**kw: Any) -> WorkerState:
    kw.setdefault("validate", True)
    return WorkerState(W, **kw)


def compute(
    key: Any,
    deps: dict[Any, list[str]] | None = None,
    *,
    prio: tuple[Any, ...] = (0,),
    nbytes: dict[Any, int] | None = None,
    resources: dict[str, float] | None = None,
    stim: str = "s",
    duration: float = 0.5,
) -> ComputeTask:
    deps = deps or {}
    spec = f"run-{key}".encode()
    return ComputeTask(
        stim, 1.0, key, spec, list(deps), deps, nbytes or {}, prio, resources=resources,
        duration=duration,
    )  # fmt: skip


def done(key: Any, nbytes: int = 10, stim: str = "s") -> ExecuteSuccess:
    return ExecuteSuccess(stim, 2.0, key, nbytes, "int", 1.5, 2.0)


def finished(key: Any, nbytes: int = 10, stim: str = "s") -> ToScheduler:
    return ToScheduler(TaskFinished(stim, 2.0, W, key, nbytes, "int", 1.5, 2.0))


def ex(key: Any, behind: bool = False) -> Execute:
    return Execute(key, f"run-{key}".encode(), behind)


def states(ws: WorkerState) -> dict[Any, str]:
    return {k: ts.state for k, ts in ws.tasks.items()}


# ----------------------------------------------------------------------------- execution


def test_execute_without_deps() -> None:
    ws = ws_()
    assert ws.handle(compute("x")) == [ex("x")]
    assert ws.tasks["x"].state == "executing" and ws.executing_count == 1
    assert ws.handle(done("x")) == [finished("x")]
    assert ws.tasks["x"].state == "memory"
    assert ws.in_memory == {"x"} and ws.memory_bytes == ws.managed_bytes == 10


def test_execute_with_deps_fetches_then_runs() -> None:
    ws = ws_()
    out = ws.handle(compute("y", {"a": ["w1"], "b": ["w1"]}, nbytes={"a": 5, "b": 7}))
    assert out == [GatherDep("w1", ["a", "b"], 12)]
    assert states(ws) == {"y": "waiting", "a": "flight", "b": "flight"}
    out = ws.handle(GatherDepSuccess("g", 2.0, "w1", {"a": 5, "b": 7}))
    assert out == [ToScheduler(AddKeys("g", 2.0, W, {"a": 5, "b": 7})), ex("y")]
    assert ws.handle(done("y")) == [finished("y")]
    # the replicas stay until the scheduler frees them
    assert states(ws) == {"y": "memory", "a": "memory", "b": "memory"}
    assert ws.handle(FreeKeys("f", 3.0, ["a", "b"])) == [
        DeleteData("a"),
        DeleteData("b"),
        ToScheduler(ReleaseWorkerData("f", 3.0, W, ["a", "b"], 0), lazy=True),
    ]
    assert set(ws.tasks) == {"y"}


def test_dep_computed_locally_is_not_fetched() -> None:
    ws = ws_(nthreads=2)
    assert ws.handle(compute("x"), compute("y", {"x": [W]})) == [ex("x")]
    assert ws.tasks["y"].state == "waiting"
    assert ws.handle(done("x")) == [finished("x"), ex("y")]


def test_priority_order_and_thread_slots() -> None:
    ws = ws_(nthreads=2)
    out = ws.handle(
        compute("c", prio=(3,)), compute("a", prio=(1,)), compute("d", prio=(4,)),
        compute("b", prio=(2,)),
    )  # fmt: skip
    # tasks start once per batch, best priority first: a and b; c and d wait
    assert out == [ex("a"), ex("b")]
    assert ws.executing_count == 2
    assert ws.handle(done("b")) == [finished("b"), ex("c")]
    assert ws.handle(done("a")) == [finished("a"), ex("d")]


def test_ready_queue_order_by_priority() -> None:
    ws = ws_(nthreads=1)
    ws.handle(compute("blocker", prio=(0,)))
    ws.handle(compute("z", prio=(9,)), compute("y", prio=(5,)), compute("x", prio=(7,)))
    assert ws.handle(done("blocker"))[-1] == ex("y")
    assert ws.handle(done("y"))[-1] == ex("x")
    assert ws.handle(done("x"))[-1] == ex("z")


def test_resources_limit_concurrency() -> None:
    ws = ws_(nthreads=4, resources={"GPU": 1})
    out = ws.handle(
        compute("g1", resources={"GPU": 1}, prio=(1,)),
        compute("g2", resources={"GPU": 1}, prio=(2,)),
        compute("cpu", prio=(3,)),
    )
    assert out == [ex("g1"), ex("cpu")]
    assert ws.tasks["g2"].state == "constrained"
    assert ws.available_resources == {"GPU": 0}
    assert ws.handle(done("g1")) == [finished("g1"), ex("g2")]
    assert ws.handle(done("g2")) == [finished("g2")]
    assert ws.available_resources == {"GPU": 1}


def test_constrained_does_not_block_ready() -> None:
    ws = ws_(nthreads=2, resources={"GPU": 1})
    ws.handle(compute("g1", resources={"GPU": 1}, prio=(0,)))
    # g2 has the better priority but no GPU is free: cpu runs meanwhile
    out = ws.handle(compute("g2", resources={"GPU": 1}, prio=(1,)), compute("cpu", prio=(5,)))
    assert out == [ex("cpu")]


def test_execute_failure() -> None:
    ws = ws_()
    ws.handle(compute("x"))
    out = ws.handle(ExecuteFailure("e", 2.0, "x", b"exc", b"tb", "ZeroDivisionError", "tb"))
    assert out == [
        ToScheduler(TaskErred("e", 2.0, W, "x", b"exc", b"tb", "ZeroDivisionError", "tb"))
    ]
    assert ws.tasks["x"].state == "error" and ws.executing_count == 0
    # retried by the scheduler
    assert ws.handle(compute("x")) == [ex("x")]


def test_secede_frees_a_slot() -> None:
    ws = ws_(nthreads=1)
    ws.handle(compute("x"), compute("y"))
    out = ws.handle(SecedeEvent("sec", 2.0, "x", 0.5))
    assert out == [ToScheduler(LongRunning("sec", 2.0, W, "x", 0.5)), ex("y")]
    assert ws.tasks["x"].state == "long-running" and ws.executing_count == 1
    assert ws.handle(done("x")) == [finished("x")]
    assert ws.handle(done("y")) == [finished("y")]


def test_reschedule() -> None:
    ws = ws_()
    ws.handle(compute("x"))
    assert ws.handle(RescheduleEvent("r", 2.0, "x")) == [ToScheduler(Reschedule("r", 2.0, W, "x"))]
    assert "x" not in ws.tasks and ws.executing_count == 0


def test_compute_task_for_key_in_memory_reports_it() -> None:
    ws = ws_()
    ws.handle(WorkerUpdateData("u", 1.0, {"x": 3}))
    assert ws.handle(compute("x", stim="c")) == [ToScheduler(TaskFinished("c", 1.0, W, "x", 3))]


# ----------------------------------------------------------------------------- fetching


def test_fetch_bundles_per_peer_up_to_byte_limit() -> None:
    ws = ws_(transfer_message_bytes_limit=100)
    deps = {k: ["w1"] for k in "abcd"}
    out = ws.handle(compute("y", deps, nbytes={"a": 40, "b": 40, "c": 40, "d": 10}))
    # one GatherDep per peer at a time; the rest waits for it
    assert out == [GatherDep("w1", ["a", "b"], 80)]
    out = ws.handle(GatherDepSuccess("g", 2.0, "w1", {"a": 40, "b": 40}))
    assert out == [
        ToScheduler(AddKeys("g", 2.0, W, {"a": 40, "b": 40})),
        GatherDep("w1", ["c", "d"], 50),
    ]


def test_fetch_in_flight_limit_and_spreading() -> None:
    ws = ws_(transfer_incoming_count_limit=2)
    out = ws.handle(
        compute("y", {"a": ["w1", "w2"], "b": ["w1", "w2"], "c": ["w3"]}, nbytes={"c": 1})
    )
    # a and b go in one bundle from w1; c from w3; w2 not needed
    assert out == [GatherDep("w1", ["a", "b"], 2048), GatherDep("w3", ["c"], 1)]
    ws2 = ws_(transfer_incoming_count_limit=1)
    out = ws2.handle(compute("y", {"a": ["w1"], "b": ["w2"], "c": ["w3"]}))
    assert out == [GatherDep("w1", ["a"], 1024)]
    assert len(ws2.in_flight) == 1
    out = ws2.handle(GatherDepSuccess("g", 2.0, "w1", {"a": 1}))
    assert out[-1] == GatherDep("w2", ["b"], 1024)


def test_fetch_bytes_in_flight_limit() -> None:
    """dask's ``transfer_incoming_bytes_limit``: the bytes in flight stay within it,
    whatever the count limit would allow; the rest waits for a transfer to end."""
    deps = {"a": ["w1"], "b": ["w2"], "c": ["w3"]}
    sizes = {"a": 400, "b": 500, "c": 300}
    ws = ws_(transfer_incoming_bytes_limit=1000)
    out = ws.handle(compute("y", deps, nbytes=sizes))
    # a and b (900 bytes) fit; c would take the bytes in flight to 1200: it waits
    assert out == [GatherDep("w1", ["a"], 400), GatherDep("w2", ["b"], 500)]
    assert ws.transfer_incoming_bytes == 900
    out = ws.handle(GatherDepSuccess("g", 2.0, "w1", {"a": 400}))
    assert out == [ToScheduler(AddKeys("g", 2.0, W, {"a": 400})), GatherDep("w3", ["c"], 300)]
    assert ws.transfer_incoming_bytes == 800
    # None (the core's default, dask's without a memory limit): only the count limit
    assert len(ws_().handle(compute("y", deps, nbytes=sizes))) == 3


def test_fetch_bytes_limit_lets_one_big_key_through_alone() -> None:
    """A key larger than the limit is still fetched when nothing else is in flight (else
    it could never arrive), and nothing joins it until it is here."""
    ws = ws_(transfer_incoming_bytes_limit=100)
    out = ws.handle(compute("y", {"big": ["w1"], "small": ["w2"]}, nbytes={"big": 5000, "small": 10}))
    assert out == [GatherDep("w1", ["big"], 5000)]
    ws2 = ws_(transfer_incoming_bytes_limit=100)
    out = ws2.handle(compute("y", {"big": ["w1"], "small": ["w1"]}, nbytes={"big": 5000, "small": 10}))
    assert out == [GatherDep("w1", ["big"], 5000)]  # not bundled with it either
    out = ws.handle(GatherDepSuccess("g", 2.0, "w1", {"big": 5000}))
    assert out == [ToScheduler(AddKeys("g", 2.0, W, {"big": 5000})), GatherDep("w2", ["small"], 10)]


def test_fetch_bytes_limit_keeps_priority_order() -> None:
    """The best key that does not fit waits; a smaller, later one does not overtake it."""
    ws = ws_(transfer_incoming_bytes_limit=1000)
    ws.handle(compute("first", {"a": ["w1"]}, nbytes={"a": 800}, prio=(1,)))
    out = ws.handle(
        compute("second", {"b": ["w2"]}, nbytes={"b": 600}, prio=(2,)),
        compute("third", {"c": ["w3"]}, nbytes={"c": 100}, prio=(3,)),
    )
    assert out == []  # b does not fit beside a; c waits behind b
    out = ws.handle(GatherDepSuccess("g", 2.0, "w1", {"a": 800}))
    assert out[-2:] == [GatherDep("w2", ["b"], 600), GatherDep("w3", ["c"], 100)]


def test_fetch_order_follows_dependent_priority() -> None:
    ws = ws_(transfer_incoming_count_limit=1)
    ws.handle(compute("late", {"b": ["w2"]}, prio=(5,)))
    out = ws.handle(compute("early", {"a": ["w1"]}, prio=(1,)))
    assert out == []  # the single transfer slot is busy with b
    out = ws.handle(GatherDepSuccess("g", 2.0, "w2", {"b": 1}))
    assert out == [
        ToScheduler(AddKeys("g", 2.0, W, {"b": 1})),
        ex("late"),
        GatherDep("w1", ["a"], 1024),
    ]


def test_failed_fetch_retries_another_holder() -> None:
    ws = ws_()
    out = ws.handle(compute("y", {"a": ["w1", "w2"]}, nbytes={"a": 5}))
    assert out == [GatherDep("w1", ["a"], 5)]
    out = ws.handle(GatherDepFailure("f", 2.0, "w1", ["a"], "connection refused"))
    assert out == [GatherDep("w2", ["a"], 5)]
    assert ws.tasks["a"].who_has == {"w2"}


def test_peer_missing_key_retries_another_holder() -> None:
    ws = ws_()
    ws.handle(compute("y", {"a": ["w1", "w2"], "b": ["w1"]}, nbytes={"a": 5, "b": 6}))
    out = ws.handle(GatherDepSuccess("g", 2.0, "w1", {"b": 6}, missing=["a"]))
    assert out == [ToScheduler(AddKeys("g", 2.0, W, {"b": 6})), GatherDep("w2", ["a"], 5)]


def test_all_holders_fail_missing_then_refresh() -> None:
    ws = ws_()
    ws.handle(compute("y", {"a": ["w1", "w2"]}, nbytes={"a": 5}))
    out = ws.handle(GatherDepFailure("f", 2.0, "w1", ["a"]))
    assert out == [GatherDep("w2", ["a"], 5)]
    out = ws.handle(GatherDepSuccess("f", 2.0, "w2", {}, missing=["a"]))
    # w2 said it lacks the key: it is named, so the scheduler can drop that holder
    assert out == [ToScheduler(MissingData("f", 2.0, W, "a", "w2"))]
    assert ws.tasks["a"].state == "missing"
    assert ws.handle(RefreshWhoHas("r", 3.0, {"a": ["w1"]})) == [GatherDep("w1", ["a"], 5)]
    out = ws.handle(GatherDepSuccess("g", 4.0, "w1", {"a": 5}))
    assert out == [ToScheduler(AddKeys("g", 4.0, W, {"a": 5})), ex("y")]


def test_failed_transfer_does_not_accuse_the_peer() -> None:
    """A network failure says nothing about what the peer holds: no errant worker."""
    ws = ws_()
    ws.handle(compute("y", {"a": ["w1"]}, nbytes={"a": 5}))
    out = ws.handle(GatherDepFailure("f", 2.0, "w1", ["a"], "connection reset"))
    assert out == [ToScheduler(MissingData("f", 2.0, W, "a", ""))]
    # the scheduler still lists w1: try it again
    assert ws.handle(RefreshWhoHas("r", 3.0, {"a": ["w1"]})) == [GatherDep("w1", ["a"], 5)]


def test_refresh_with_no_holders_makes_fetch_missing() -> None:
    ws = ws_(transfer_incoming_count_limit=1)
    ws.handle(compute("y", {"a": ["w1"], "b": ["w2"]}))
    assert ws.tasks["b"].state == "fetch"
    out = ws.handle(RefreshWhoHas("r", 2.0, {"b": []}))
    assert out == [ToScheduler(MissingData("r", 2.0, W, "b", ""))]


def test_acquire_replicas() -> None:
    ws = ws_()
    out = ws.handle(AcquireReplicas("r", 1.0, {"a": ["w1"], "b": ["w1"]}, {"a": 1, "b": 2}))
    assert out == [GatherDep("w1", ["a", "b"], 3)]
    out = ws.handle(GatherDepSuccess("g", 2.0, "w1", {"a": 1, "b": 2}))
    assert out == [ToScheduler(AddKeys("g", 2.0, W, {"a": 1, "b": 2}))]
    assert states(ws) == {"a": "memory", "b": "memory"}


def test_who_has_never_includes_self() -> None:
    ws = ws_()
    ws.handle(compute("y", {"a": [W, "w1"]}))
    assert ws.tasks["a"].who_has == {"w1"}


# ----------------------------------------------------------------------------- free keys / cancel


def test_free_keys_while_executing_drops_result() -> None:
    ws = ws_()
    ws.handle(compute("x"), compute("z"))
    assert ws.handle(FreeKeys("f", 2.0, ["x"])) == []
    assert ws.tasks["x"].state == "cancelled" and ws.executing_count == 1
    # the thread finishes: result dropped, slot free, next task runs
    assert ws.handle(done("x")) == [DeleteData("x"), ex("z")]
    assert "x" not in ws.tasks


def test_cancelled_then_asked_again_keeps_running() -> None:
    ws = ws_()
    ws.handle(compute("x"))
    ws.handle(FreeKeys("f", 2.0, ["x"]))
    assert ws.handle(compute("x")) == []  # no second Execute
    assert ws.tasks["x"].state == "executing"
    assert ws.handle(done("x")) == [finished("x")]


def test_cancelled_execution_wanted_as_dependency_resumes() -> None:
    ws = ws_(nthreads=2)
    ws.handle(compute("x"))
    ws.handle(FreeKeys("f", 2.0, ["x"]))  # stolen elsewhere, say
    out = ws.handle(compute("y", {"x": ["w1"]}))
    assert out == []
    assert ws.tasks["x"].state == "resumed"
    # the local run finishes first: it is kept as a replica, reported with AddKeys
    out = ws.handle(done("x", stim="d"))
    assert out == [ToScheduler(AddKeys("d", 2.0, W, {"x": 10})), ex("y")]


def test_resumed_execution_that_fails_is_fetched() -> None:
    ws = ws_(nthreads=2)
    ws.handle(compute("x"))
    ws.handle(FreeKeys("f", 2.0, ["x"]))
    ws.handle(compute("y", {"x": ["w1"]}))
    out = ws.handle(ExecuteFailure("e", 2.0, "x", b"", b""))
    assert out == [GatherDep("w1", ["x"], 1024)]


def test_free_keys_in_flight_cancels_transfer() -> None:
    ws = ws_()
    ws.handle(compute("y", {"a": ["w1"]}))
    assert ws.handle(FreeKeys("f", 2.0, ["y"])) == []
    assert ws.tasks["a"].state == "cancelled"
    assert ws.handle(GatherDepSuccess("g", 3.0, "w1", {"a": 1})) == [DeleteData("a")]
    assert ws.tasks == {}


def test_compute_key_in_flight_waits_for_transfer() -> None:
    ws = ws_(nthreads=2)
    ws.handle(compute("y", {"a": ["w1"]}))
    out = ws.handle(compute("a", stim="c"))
    assert out == [] and ws.tasks["a"].state == "resumed"
    out = ws.handle(GatherDepSuccess("g", 2.0, "w1", {"a": 4}))
    assert out == [ToScheduler(TaskFinished("g", 2.0, W, "a", 4, "", 2.0, 2.0)), ex("y")]


def test_compute_key_in_flight_computes_when_transfer_fails() -> None:
    ws = ws_(nthreads=2)
    ws.handle(compute("y", {"a": ["w1"]}))
    ws.handle(compute("a"))
    assert ws.handle(GatherDepFailure("g", 2.0, "w1", ["a"])) == [ex("a")]
    assert ws.handle(done("a")) == [finished("a"), ex("y")]


def test_freed_dependency_kept_until_dependent_finishes() -> None:
    ws = ws_()
    ws.handle(compute("y", {"a": ["w1"]}))
    ws.handle(GatherDepSuccess("g", 1.0, "w1", {"a": 1}))
    assert ws.tasks["y"].state == "executing"
    assert ws.handle(FreeKeys("f", 2.0, ["a"])) == []
    assert ws.tasks["a"].state == "memory"
    assert ws.handle(done("y")) == [
        finished("y"),
        DeleteData("a"),
        ToScheduler(ReleaseWorkerData("s", 2.0, W, ["a"], 0), lazy=True),
    ]
    assert set(ws.tasks) == {"y"}


def test_free_waiting_task_releases_unneeded_fetches() -> None:
    ws = ws_(transfer_incoming_count_limit=1)
    ws.handle(compute("y", {"a": ["w1"], "b": ["w2"]}))
    assert states(ws) == {"y": "waiting", "a": "flight", "b": "fetch"}
    assert ws.handle(FreeKeys("f", 2.0, ["y"])) == []
    assert states(ws) == {"a": "cancelled"}
    assert ws.handle(GatherDepFailure("g", 3.0, "w1", ["a"])) == []
    assert ws.tasks == {}


def test_free_unknown_key_is_ignored() -> None:
    assert ws_().handle(FreeKeys("f", 1.0, ["nope"])) == []


# ----------------------------------------------------------------------------- prefetch

SHORT = 0.0001  # seconds: a trivial task's estimated duration


def test_prefetch_queues_short_tasks_behind_the_running_one() -> None:
    ws = ws_(nthreads=1, prefetch=2)
    out = ws.handle(*(compute(k, prio=(i,), duration=SHORT) for i, k in enumerate("abcd")))
    # one on the thread, two more queued for it: it goes on without waiting for the loop
    assert out == [ex("a"), ex("b", behind=True), ex("c", behind=True)]
    assert ws.executing_count == 3 and ws.tasks["d"].state == "ready"
    # the loop hears of a and b together: d is queued behind c
    assert ws.handle(done("a"), done("b")) == [finished("a"), finished("b"), ex("d", behind=True)]
    assert ws.handle(done("c")) == [finished("c")]
    assert ws.handle(done("d")) == [finished("d")]
    assert ws.executing_count == 0


def test_no_prefetch_by_default_or_for_long_or_constrained_tasks() -> None:
    assert ws_(nthreads=1).handle(compute("a", duration=SHORT), compute("b", duration=SHORT)) == [
        ex("a")
    ]
    ws = ws_(nthreads=1, prefetch=4, resources={"GPU": 1})
    # behind a task estimated at 0.5 s nothing waits: it could still be stolen instead
    assert ws.handle(compute("long", prio=(0,)), compute("b", prio=(1,), duration=SHORT)) == [
        ex("long")
    ]
    assert ws.handle(done("long"))[-1] == ex("b")
    # a task that needs resources never takes them while it waits for a thread
    out = ws.handle(compute("g", prio=(2,), resources={"GPU": 1}, duration=SHORT))
    assert out == [] and ws.tasks["g"].state == "constrained"
    assert ws.handle(done("b")) == [finished("b"), ex("g")]


def test_prefetch_stops_at_its_budget_of_estimated_seconds_per_thread() -> None:
    # 1 ms per thread: the running task's 0.4 ms and one more 0.4 ms fit, a third does not
    ws = ws_(nthreads=1, prefetch=8, prefetch_duration=0.001)
    out = ws.handle(*(compute(k, prio=(i,), duration=0.0004) for i, k in enumerate("abc")))
    assert out == [ex("a"), ex("b", behind=True)]
    assert ws.handle(done("a")) == [finished("a"), ex("c", behind=True)]
    ws2 = ws_(nthreads=2, prefetch=8, prefetch_duration=0.001)  # 2 ms for two threads
    out = ws2.handle(*(compute(k, prio=(i,), duration=0.0004) for i, k in enumerate("abcdef")))
    assert out == [ex("a"), ex("b"), ex("c", behind=True), ex("d", behind=True), ex("e", True)]


def test_a_prefetched_task_is_not_stolen_and_can_be_cancelled() -> None:
    ws = ws_(nthreads=1, prefetch=1)
    ws.handle(compute("a", prio=(0,), duration=SHORT), compute("b", prio=(1,), duration=SHORT))
    out = ws.handle(StealRequest("st", 2.0, "b"))  # handed to the shell: it will run here
    assert out == [ToScheduler(StealResponse("st", 2.0, W, "b", "executing"))]
    assert ws.handle(FreeKeys("f", 2.0, ["b"])) == []
    assert ws.tasks["b"].state == "cancelled"
    assert ws.handle(done("a"), done("b")) == [finished("a"), DeleteData("b")]
    assert "b" not in ws.tasks


def test_secede_ahead_of_a_prefetched_task() -> None:
    ws = ws_(nthreads=1, prefetch=1)
    ws.handle(*(compute(k, prio=(i,), duration=SHORT) for i, k in enumerate("abc")))
    # a leaves the slot: b (queued) now holds it, c is queued behind b
    out = ws.handle(SecedeEvent("sec", 2.0, "a", 0.5))
    assert out == [ToScheduler(LongRunning("sec", 2.0, W, "a", 0.5)), ex("c", behind=True)]
    assert ws.executing_count == 2 and ws.tasks["a"].state == "long-running"


# ----------------------------------------------------------------------------- stealing


def test_steal_before_start_releases() -> None:
    ws = ws_(nthreads=1)
    ws.handle(compute("x"), compute("y", {"a": ["w1"]}))
    out = ws.handle(StealRequest("st", 2.0, "y"))
    assert out == [ToScheduler(StealResponse("st", 2.0, W, "y", "waiting"))]
    assert states(ws) == {"x": "executing", "a": "cancelled"}


def test_steal_ready_task() -> None:
    ws = ws_(nthreads=1)
    ws.handle(compute("x"), compute("y"))
    out = ws.handle(StealRequest("st", 2.0, "y"))
    assert out == [ToScheduler(StealResponse("st", 2.0, W, "y", "ready"))]
    assert "y" not in ws.tasks
    assert ws.handle(done("x")) == [finished("x")]  # y does not run


def test_steal_constrained_task() -> None:
    ws = ws_(nthreads=2, resources={"GPU": 1})
    ws.handle(compute("g1", resources={"GPU": 1}), compute("g2", resources={"GPU": 1}))
    out = ws.handle(StealRequest("st", 2.0, "g2"))
    assert out == [ToScheduler(StealResponse("st", 2.0, W, "g2", "constrained"))]
    assert "g2" not in ws.tasks


def test_steal_after_start_refused() -> None:
    ws = ws_()
    ws.handle(compute("x"))
    out = ws.handle(StealRequest("st", 2.0, "x"))
    assert out == [ToScheduler(StealResponse("st", 2.0, W, "x", "executing"))]
    assert ws.tasks["x"].state == "executing"


def test_steal_unknown_key() -> None:
    out = ws_().handle(StealRequest("st", 2.0, "x"))
    assert out == [ToScheduler(StealResponse("st", 2.0, W, "x", None))]


# ----------------------------------------------------------------------------- table, story


def test_invalid_transition_carries_story() -> None:
    ws = ws_()
    ws.handle(compute("x", stim="compute-x"))
    ts = ws.tasks["x"]
    with pytest.raises(InvalidTransition) as info:
        transition(ws, ts, "fetch", "bad", 3.0, [])
    err = info.value
    assert (err.key, err.start, err.finish) == ("x", "executing", "fetch")
    assert err.story == [
        ("x", "released", "ready", "compute-x", 1.0),  # no inputs: no waiting step
        ("x", "ready", "executing", "compute-x", 1.0),
    ]
    assert "compute-x" in str(err)


def test_inputs_all_here_skip_waiting_else_wait() -> None:
    ws = ws_(nthreads=1)
    ws.handle(compute("a"))
    ws.handle(done("a"))
    ws.handle(compute("b", {"a": []}))  # a in memory here: straight to ready
    ws.handle(compute("c", {"a": [], "z": ["w2"]}))  # z to fetch: waits
    starts = [(s, f) for k in "bc" for _, s, f, _, _ in ws.story(k) if s == "released"]
    assert starts == [("released", "ready"), ("released", "waiting")]
    assert ws.tasks["a"].dependents == {ws.tasks["b"]: None, ws.tasks["c"]: None}


def test_execute_success_for_task_not_running_raises() -> None:
    ws = ws_()
    ws.handle(WorkerUpdateData("u", 1.0, {"x": 3}))
    with pytest.raises(InvalidTransition):
        ws.handle(done("x"))


def test_story_is_bounded() -> None:
    ws = WorkerState(W, story_limit=5)
    for i in range(10):
        ws.handle(compute(i))
        ws.handle(done(i))  # a later batch: Execute goes out after the whole first one
    assert len(ws._story) == 5


def test_table_edges_are_strings() -> None:
    for start, finish in TRANSITIONS:
        assert isinstance(start, str) and isinstance(finish, str)


def test_missing_dependency_fetched_when_new_compute_names_holders() -> None:
    ws = ws_(nthreads=2)
    out = ws.handle(compute("y", {"a": []}))
    assert out == [ToScheduler(MissingData("s", 1.0, W, "a", ""))]
    out = ws.handle(compute("z", {"a": ["w2"]}))
    assert out == [GatherDep("w2", ["a"], 1024)]


def test_freed_compute_of_key_in_flight_still_fetched_for_dependent() -> None:
    ws = ws_(nthreads=2)
    ws.handle(compute("y", {"a": ["w1"]}))  # the fetch starts after this batch
    ws.handle(compute("a"))
    assert ws.tasks["a"].state == "resumed"
    assert ws.handle(FreeKeys("f", 2.0, ["a"])) == []
    assert ws.tasks["a"].state == "flight"
    out = ws.handle(GatherDepSuccess("g", 3.0, "w1", {"a": 1}))
    assert out == [ToScheduler(AddKeys("g", 3.0, W, {"a": 1})), ex("y")]


def test_freed_result_without_local_reader_is_forgotten_in_one_step() -> None:
    ws = ws_(nthreads=1)
    ws.handle(compute("a"))
    ws.handle(done("a"))
    out = ws.handle(FreeKeys("f", 3.0, ["a"]))
    assert out == [DeleteData("a"), ToScheduler(ReleaseWorkerData("f", 3.0, W, ["a"], 0), lazy=True)]
    assert "a" not in ws.tasks
    assert ws.story("a")[-1] == ("a", "memory", "forgotten", "f", 3.0)


def test_a_fetch_keeps_its_holders_when_a_compute_task_names_only_this_worker() -> None:
    """Found by the cluster machine (2026-12-06): this worker fetched ``a`` and reported
    the replica, while a ``FreeKeys(a)`` sent before that report was still on its way; the
    free dropped the copy, and before the scheduler heard so it named this worker as the
    only holder of ``a`` in a dependent's ``ComputeTask``. The worker, fetching ``a``
    again, was left with nobody to fetch from (an invariant failure; a stuck task without
    validation). It keeps the holders it had; a fetch that fails ends in ``MissingData``."""
    ws = ws_(nthreads=2, transfer_incoming_count_limit=1)
    ws.handle(compute("y", {"b": ["w2"]}))  # the one transfer slot: b from w2
    ws.handle(compute("z", {"a": ["w1"]}))
    assert ws.tasks["a"].state == "fetch"
    assert ws.handle(compute("x", {"a": [W]})) == []
    assert ws.tasks["a"].state == "fetch" and ws.tasks["a"].who_has == {"w1"}
    out = ws.handle(GatherDepSuccess("g", 2.0, "w2", {"b": 1}))
    assert GatherDep("w1", ["a"], 1024) in out


def test_a_free_keeps_a_value_scattered_after_it_was_sent() -> None:
    """A ``FreeKeys`` names the latest data update (scatter) of each key the scheduler
    knew of; a value put here by a newer update stays, a known one goes."""
    ws = ws_()
    ws.handle(WorkerUpdateData("u1", 1.0, {"x": 8}))
    assert ws.scatter_seq == 1
    ws.handle(WorkerUpdateData("u2", 1.0, {"x": 8}))  # scattered again: update 2
    assert ws.handle(FreeKeys("f", 2.0, ["x"], {"x": 1})) == []  # sent knowing update 1
    assert ws.tasks["x"].state == "memory"
    out = ws.handle(FreeKeys("f", 3.0, ["x"], {"x": 2}))
    assert out == [DeleteData("x"), ToScheduler(ReleaseWorkerData("f", 3.0, W, ["x"], 2), lazy=True)]
    assert "x" not in ws.tasks
    ws.handle(compute("x"))
    ws.handle(done("x"))
    assert ws.handle(FreeKeys("f", 4.0, ["x"]))[0] == DeleteData("x")  # computed: no number
