"""The Active Memory Manager in the scheduler core: ReduceReplicas on its ticks.

dask runs ReduceReplicas every 2 s by default: a key fetched by several workers keeps
one copy once the tasks that read it are done, instead of occupying memory on each.
"""

from __future__ import annotations

from test_core_scheduler import A, B, C, cluster, ev, finished, frees, spec
from trioscheduler.core.messages import (
    ActiveMemoryManager,
    AddKeys,
    CloseWorker,
    RetireWorker,
    Tick,
    UpdateData,
    UpdateGraph,
    WorkerStatusChange,
)
from trioscheduler.core.scheduler import SchedulerState


def read_by_three(**kw: object) -> SchedulerState:
    """``x`` computed on A, fetched by B and C for ``y`` and ``z``, which still run."""
    s = cluster((A, 1), (B, 1), (C, 1), **kw)
    graph = [
        spec("x", workers=[A]),
        spec("y", ("x",), workers=[B]),
        spec("z", ("x",), workers=[C]),
    ]
    s.handle(ev(UpdateGraph, "c", graph, ["x", "y", "z"]))
    s.handle(finished(A, "x", nbytes=100))
    s.handle(ev(AddKeys, B, {"x": 100}), ev(AddKeys, C, {"x": 100}))
    assert s.tasks["x"].who_has == {A, B, C}
    return s


def test_copies_are_trimmed_once_their_readers_are_done() -> None:
    s = read_by_three(amm_interval=2.0)
    assert s.handle(ev(Tick, now=1.0)) == []  # the AMM's first tick: it runs 2 s later
    assert s.handle(ev(Tick, now=2.5)) == []
    # y and z read the copies on B and C: those stay; A's goes
    assert frees(s.handle(ev(Tick, now=3.0))) == [(A, ["x"])]
    assert s.tasks["x"].who_has == {B, C}
    s.handle(finished(B, "y"), finished(C, "z"))
    assert frees(s.handle(ev(Tick, now=4.0))) == []  # not due before 5.0
    # nobody reads x any more: one copy is enough (the client still holds a future)
    assert frees(s.handle(ev(Tick, now=5.0))) == [(B, ["x"])]
    assert s.tasks["x"].who_has == {C} and s.tasks["x"].state == "memory"


def test_without_the_amm_every_copy_stays() -> None:
    s = read_by_three()  # the core's default: off (the shell turns it on, as dask's)
    s.handle(finished(B, "y"), finished(C, "z"))
    for now in (1.0, 5.0, 20.0):
        assert frees(s.handle(ev(Tick, now=now))) == []
    assert s.tasks["x"].who_has == {A, B, C}


def test_client_amm_start_stop_and_run_once() -> None:
    s = read_by_three()
    s.handle(finished(B, "y"), finished(C, "z"))
    s.handle(ev(ActiveMemoryManager, "start", 1.0, now=10.0))
    assert s.amm_interval == 1.0
    assert frees(s.handle(ev(Tick, now=10.5))) == []
    # B and C hold more (y, z): they drop theirs
    assert frees(s.handle(ev(Tick, now=11.0))) == [(B, ["x"]), (C, ["x"])]
    assert s.tasks["x"].who_has == {A}
    s.handle(ev(ActiveMemoryManager, "stop"))
    assert s.amm_interval is None
    s.handle(ev(UpdateData, "c", {"d": [A, B]}, {"d": 10}))
    assert frees(s.handle(ev(Tick, now=20.0))) == []
    eff = s.handle(ev(ActiveMemoryManager, "run_once"))
    assert frees(eff) == [(A, ["d"])] and s.amm_dropped == 3  # in all
    eff = s.handle(ev(ActiveMemoryManager, "bogus"))
    assert [e.level for e in eff] == ["warning"]


def test_copies_on_paused_or_retiring_workers_go_first() -> None:
    s = cluster((A, 1), (B, 1), (C, 1), amm_interval=0.0)
    s.handle(ev(UpdateData, "c", {"d": [A, B, C]}, {"d": 10}))
    s.handle(ev(UpdateData, "c", {"big": [C]}, {"big": 10_000}))  # C is the fullest
    s.handle(ev(WorkerStatusChange, B, "paused"))
    s.handle(ev(Tick, now=1.0))
    # paused B first, then the fullest running worker: A keeps the copy
    assert frees(s.handle(ev(Tick, now=2.0))) == [(B, ["d"]), (C, ["d"])]
    assert s.tasks["d"].who_has == {A}


def test_a_retiring_worker_drops_its_copy_not_the_one_it_handed_over() -> None:
    """dask's guard against ping-pong with RetireWorker: the copy the retirement made on
    a running worker stays, so the retirement completes."""
    s = cluster((A, 1), (B, 1), amm_interval=0.0)
    s.handle(ev(UpdateData, "c", {"d": [A]}, {"d": 10}))
    s.handle(ev(UpdateData, "c", {"big": [B]}, {"big": 10_000}))  # B is the fullest
    s.handle(ev(Tick, now=1.0))
    s.handle(ev(RetireWorker, A))  # A copies d to B, then closes
    eff = s.handle(ev(AddKeys, B, {"d": 10}))
    assert CloseWorker(A, "retired") in eff
    assert s.tasks["d"].who_has == {B}
    s2 = cluster((A, 1), (B, 1), amm_interval=0.0)
    s2.handle(ev(UpdateData, "c", {"d": [A, B], "u": [A]}, {"d": 10, "u": 10}))
    s2.handle(ev(UpdateData, "c", {"big": [B]}, {"big": 10_000}))
    s2.handle(ev(Tick, now=1.0))
    s2.handle(ev(RetireWorker, A))  # u is being copied to B: A is closing meanwhile
    assert s2.workers[A].status == "closing"
    assert frees(s2.handle(ev(Tick, now=2.0))) == [(A, ["d"])]  # not B's, the fullest
