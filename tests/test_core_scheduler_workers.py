"""The scheduler core and its workers: restrictions, loss, retirement, pause, time-outs."""

from __future__ import annotations

import pickle

from test_core_scheduler import (
    A,
    B,
    C,
    cluster,
    computes,
    ev,
    finished,
    frees,
    spec,
    states,
    to_clients,
)
from trioscheduler.core.errors import KilledWorker
from trioscheduler.core.messages import (
    AcquireReplicas,
    AddKeys,
    AddWorker,
    CloseWorker,
    KeyErred,
    LongRunning,
    MissingData,
    RefreshWhoHas,
    ReleaseWorkerData,
    RemoveWorker,
    Reschedule,
    RetireWorker,
    Tick,
    ToClient,
    ToWorker,
    UpdateData,
    UpdateGraph,
    WorkerHeartbeat,
    WorkerStatusChange,
)
from trioscheduler.core.scheduler import SchedulerState

# ------------------------------------------------------------------ restrictions


def test_workers_restriction_by_address_and_name() -> None:
    s = cluster((A, 1), (B, 1))
    eff = s.handle(
        ev(UpdateGraph, "c", [spec("x", workers=[B]), spec("y", workers=["a"])], ["x", "y"])
    )
    assert sorted(computes(eff)) == [(A, "y"), (B, "x")]


def test_no_worker_until_a_matching_worker_joins() -> None:
    s = cluster((A, 1))
    eff = s.handle(ev(UpdateGraph, "c", [spec("x", workers=["gpu-box"])], ["x"]))
    assert computes(eff) == [] and states(s) == {"x": "no-worker"}
    eff = s.handle(ev(AddWorker, B, 1))  # not it
    assert computes(eff) == [] and states(s) == {"x": "no-worker"}
    eff = s.handle(ev(AddWorker, C, 1, name="gpu-box"))
    assert computes(eff) == [(C, "x")]


def test_no_workers_at_all_then_one_joins() -> None:
    s = cluster()
    s.handle(ev(UpdateGraph, "c", [spec("x"), spec("y", ("x",))], ["y"]))
    assert states(s) == {"x": "queued", "y": "waiting"}  # a root task waits in the queue
    eff = s.handle(ev(AddWorker, A, 1))
    assert computes(eff) == [(A, "x")]


def test_allow_other_workers_is_a_preference() -> None:
    s = cluster((A, 1))
    eff = s.handle(
        ev(UpdateGraph, "c", [spec("x", workers=["ghost"], allow_other_workers=True)], ["x"])
    )
    assert computes(eff) == [(A, "x")]
    s2 = cluster((A, 4), (B, 4))
    eff = s2.handle(ev(UpdateGraph, "c", [spec("x", workers=[B], allow_other_workers=True)], ["x"]))
    assert computes(eff) == [(B, "x")]


def test_resources_are_hard_constraints() -> None:
    s = cluster((A, 4))
    eff = s.handle(ev(UpdateGraph, "c", [spec("x", resources={"GPU": 1})], ["x"]))
    assert states(s) == {"x": "no-worker"}
    eff = s.handle(ev(AddWorker, B, 1, resources={"GPU": 2}))
    assert computes(eff) == [(B, "x")]
    assert eff[0].msg.resources == {"GPU": 1}


# ------------------------------------------------------------------ worker loss


def test_worker_loss_reschedules_and_recomputes_from_lineage() -> None:
    s = cluster((A, 1), (B, 1))
    s.handle(
        ev(UpdateGraph, "c", [spec("x", workers=[A]), spec("y", ("x",), workers=[B])], ["x", "y"])
    )
    s.handle(finished(A, "x"))
    assert states(s) == {"x": "memory", "y": "processing"}
    eff = s.handle(ev(RemoveWorker, A, reason="crash"))
    # y cannot run without x: freed on B; x (only copy lost, wanted) recomputed
    assert frees(eff) == [(B, ["y"])]
    assert ("c", "KeyLost", "x") in to_clients(eff)
    assert states(s) == {"x": "no-worker", "y": "waiting"}  # x is restricted to the dead A
    eff = s.handle(ev(AddWorker, A, 1, name="a"))
    assert computes(eff) == [(A, "x")]
    eff = s.handle(finished(A, "x"))
    assert computes(eff) == [(B, "y")]


def test_lost_intermediate_is_recomputed_with_its_dependencies() -> None:
    s = cluster((A, 1), (B, 1))
    loose = {"allow_other_workers": True}
    g = [
        spec("x", workers=[A], **loose),
        spec("y", ("x",), workers=[B], **loose),
        spec("z", ("y",), workers=[A], **loose),
    ]
    s.handle(ev(UpdateGraph, "c", g, ["z"]))
    s.handle(finished(A, "x"))
    eff = s.handle(finished(B, "y"))
    assert computes(eff) == [(A, "z")] and frees(eff) == [(A, ["x"])]
    assert states(s)["x"] == "released"
    eff = s.handle(ev(RemoveWorker, B))
    assert frees(eff) == [(A, ["z"])]
    assert computes(eff) == [(A, "x")]  # lineage: x again, then y, then z
    assert states(s) == {"x": "processing", "y": "waiting", "z": "waiting"}
    assert computes(s.handle(finished(A, "x"))) == [(A, "y")]
    assert computes(s.handle(finished(A, "y"))) == [(A, "z")]


def test_killed_worker_after_allowed_failures() -> None:
    s = cluster((A, 1), allowed_failures=3)
    s.handle(ev(UpdateGraph, "c", [spec("bad"), spec("after", ("bad",))], ["after"]))
    lost = []
    for i in range(3):
        on = s.tasks["bad"].processing_on
        assert on is not None
        lost.append(on)
        eff = s.handle(ev(RemoveWorker, on, reason="segfault"))
        if i < 2:
            assert states(s)["bad"] == "queued"
            eff = s.handle(ev(AddWorker, f"tcp://w{i}", 1))
            assert computes(eff) == [(f"tcp://w{i}", "bad")]
    assert states(s) == {"bad": "erred", "after": "erred"}
    (msg,) = [e.msg for e in eff if isinstance(e, ToClient)]
    assert isinstance(msg, KeyErred) and msg.key == "after"
    exc = pickle.loads(msg.exception)
    assert isinstance(exc, KilledWorker)
    assert exc.workers == lost and exc.allowed_failures == 3
    assert all(w in msg.exception_text for w in lost)


def test_expected_removal_is_not_suspicious() -> None:
    s = cluster((A, 1), (B, 1), allowed_failures=1)
    s.handle(ev(UpdateGraph, "c", [spec("x", workers=[A], allow_other_workers=True)], ["x"]))
    s.handle(ev(RemoveWorker, A, expected=True))
    assert states(s) == {"x": "processing"} and s.tasks["x"].suspicious == 0


def test_heartbeat_timeout_via_tick() -> None:
    s = SchedulerState(validate=True, worker_timeout=30.0)
    s.handle(ev(AddWorker, A, 1, now=0.0), ev(AddWorker, B, 1, now=0.0))
    s.handle(
        ev(UpdateGraph, "c", [spec("x", workers=[B], allow_other_workers=True)], ["x"], now=1.0)
    )
    s.handle(ev(WorkerHeartbeat, A, now=20.0))
    assert s.handle(ev(Tick, now=25.0)) == []
    eff = s.handle(ev(Tick, now=40.0))
    closes = [e for e in eff if isinstance(e, CloseWorker)]
    assert [c.worker for c in closes] == [B]
    assert set(s.workers) == {A}
    assert computes(eff) == [(A, "x")]
    assert s.tasks["x"].suspicious == 1


def test_remove_unknown_worker_is_ignored() -> None:
    s = cluster((A, 1))
    assert s.handle(ev(RemoveWorker, "tcp://nobody")) == []


# ------------------------------------------------------------------ retire, pause


def test_retire_replicates_unique_data_then_closes() -> None:
    s = cluster((A, 1), (B, 1))
    s.handle(ev(UpdateGraph, "c", [spec("x", workers=[A])], ["x"]))
    s.handle(finished(A, "x", nbytes=50))
    eff = s.handle(ev(RetireWorker, A))
    acq = [e for e in eff if isinstance(e, ToWorker) and isinstance(e.msg, AcquireReplicas)]
    assert [(e.worker, e.msg.who_has, e.msg.nbytes) for e in acq] == [(B, {"x": [A]}, {"x": 50})]
    assert s.workers[A].status == "closing"
    eff = s.handle(ev(UpdateGraph, "c", [spec("y")], ["y"]))
    assert computes(eff) == [(B, "y")]  # no new task for a retiring worker
    eff = s.handle(ev(AddKeys, B, {"x": 50}))
    assert [e for e in eff if isinstance(e, CloseWorker)] == [CloseWorker(A, "retired")]
    assert A not in s.workers
    assert s.tasks["x"].who_has == {B} and states(s)["x"] == "memory"


def test_retire_without_other_workers_refuses() -> None:
    s = cluster((A, 1))
    s.handle(ev(UpdateGraph, "c", [spec("x")], ["x"]))
    s.handle(finished(A, "x"))
    eff = s.handle(ev(RetireWorker, A))
    assert [e.level for e in eff] == ["warning"]
    assert s.workers[A].status == "running"


def test_retire_with_no_unique_data_closes_at_once() -> None:
    s = cluster((A, 1), (B, 1))
    eff = s.handle(ev(RetireWorker, A))
    assert eff == [CloseWorker(A, "retired")]
    assert set(s.workers) == {B}


def test_paused_worker_gets_no_new_tasks() -> None:
    s = cluster((A, 1))
    s.handle(ev(WorkerStatusChange, A, "paused"))
    eff = s.handle(ev(UpdateGraph, "c", [spec("x")], ["x"]))
    assert computes(eff) == [] and states(s) == {"x": "queued"}
    eff = s.handle(ev(WorkerStatusChange, A, "running"))
    assert computes(eff) == [(A, "x")]


# ------------------------------------------------------------------ replicas and odd reports


def test_add_worker_with_data_and_replicas() -> None:
    s = cluster((A, 1))
    s.handle(ev(UpdateData, "c", {"d": [A]}, {"d": 10}))
    eff = s.handle(ev(AddWorker, B, 1, data={"d": 10, "junk": 5}))
    assert frees(eff) == [(B, ["junk"])]
    assert s.tasks["d"].who_has == {A, B}
    s.handle(ev(ReleaseWorkerData, A, ["d"]))
    assert s.tasks["d"].who_has == {B}
    eff = s.handle(ev(AddKeys, C, {"d": 10}))  # unknown worker: ignored
    assert eff == []


def test_missing_data_refreshes_or_recomputes() -> None:
    s = cluster((A, 1), (B, 1), (C, 1))
    s.handle(ev(UpdateGraph, "c", [spec("x", workers=[A])], ["x"]))
    s.handle(finished(A, "x"))
    s.handle(ev(AddKeys, B, {"x": 8}))
    eff = s.handle(ev(MissingData, C, "x", A))
    assert [(e.worker, e.msg.who_has) for e in eff if isinstance(e.msg, RefreshWhoHas)] == [
        (C, {"x": [B]})
    ]
    assert s.tasks["x"].who_has == {B}
    eff = s.handle(ev(MissingData, C, "x", B))
    assert ("c", "KeyLost", "x") in to_clients(eff)
    assert computes(eff) == [(A, "x")]


def test_stale_results_never_corrupt_state() -> None:
    s = cluster((A, 1), (B, 1))
    s.handle(ev(UpdateGraph, "c", [spec("x", workers=[A])], ["x"]))
    eff = s.handle(finished(B, "x"))  # B never ran it
    assert frees(eff) == [(B, ["x"])] and states(s) == {"x": "processing"}
    s.handle(finished(A, "x"))
    eff = s.handle(finished(B, "x"))  # an extra replica of a finished task is accepted
    assert eff == [] and s.tasks["x"].who_has == {A, B}
    assert s.handle(finished("tcp://dead", "x")) == []


def test_long_running_frees_thread_slot() -> None:
    s = cluster((A, 1))
    s.handle(ev(UpdateGraph, "c", [spec("x"), spec("y")], ["x", "y"]))
    ws = s.workers[A]
    assert len(ws.processing) == 2 and A in s.saturated
    s.handle(ev(LongRunning, A, "x"))
    assert ws.processing["x"] == 0.0 and ws.occupancy == 0.5
    assert A not in s.saturated


def test_reschedule_sends_task_again() -> None:
    s = cluster((A, 1))
    s.handle(ev(UpdateGraph, "c", [spec("x")], ["x"]))
    eff = s.handle(ev(Reschedule, A, "x"))
    assert frees(eff) == [(A, ["x"])] and computes(eff) == [(A, "x")]
    assert s.handle(ev(Reschedule, B, "x")) == []


def test_loose_worker_preference_with_resources_falls_back() -> None:
    s = cluster((A, 1))
    s.handle(ev(AddWorker, B, 1, resources={"GPU": 1}))
    g = [spec("x", workers=[A], allow_other_workers=True, resources={"GPU": 1})]
    eff = s.handle(ev(UpdateGraph, "c", g, ["x"]))
    assert computes(eff) == [(B, "x")]


def test_workers_restriction_by_host() -> None:
    s = cluster(("tcp://10.0.0.1:1000", 1), ("tcp://10.0.0.2:1000", 1))
    eff = s.handle(ev(UpdateGraph, "c", [spec("x", workers=["10.0.0.2"])], ["x"]))
    assert computes(eff) == [("tcp://10.0.0.2:1000", "x")]
    eff = s.handle(ev(UpdateGraph, "c", [spec("y", workers=["10.0.0.3"])], ["y"]))
    assert states(s)["y"] == "no-worker"
    eff = s.handle(ev(AddWorker, "tcp://10.0.0.3:2000", 1))
    assert computes(eff) == [("tcp://10.0.0.3:2000", "y")]
    s.handle(ev(RemoveWorker, "tcp://10.0.0.3:2000"))
    assert "10.0.0.3" not in s.hosts


def test_replica_report_of_a_task_being_computed_is_its_result() -> None:
    """Regression (both-cores run): a worker that fetched ``x`` just before ``x`` was
    lost and re-sent to it reports the copy; freeing it would race the ComputeTask."""
    s = cluster((A, 1), (B, 1))
    s.handle(ev(UpdateGraph, "c", [spec("x", workers=[A]), spec("y", workers=[B])], ["x", "y"]))
    eff = s.handle(ev(AddKeys, A, {"x": 8}))
    assert frees(eff) == [] and states(s)["x"] == "memory" and s.tasks["x"].who_has == {A}
    eff = s.handle(ev(AddKeys, A, {"y": 8}))  # y runs on B: A's copy is the result, B stops
    assert frees(eff) == [(B, ["y"])] and s.tasks["y"].who_has == {A}
