"""Work stealing through the scheduler core, and a seeded random cluster run."""

from __future__ import annotations

import math
import os
import random
from typing import Any

import pytest

from test_core_scheduler import A, B, C, cluster, computes, ev, finished, frees, spec, states
from trioscheduler.core.messages import (
    AcquireReplicas,
    AddKeys,
    AddWorker,
    CancelKeys,
    ClientDesiresKeys,
    ClientReleasesKeys,
    CloseWorker,
    ComputeTask,
    FreeKeys,
    LongRunning,
    MissingData,
    ReleaseWorkerData,
    RemoveWorker,
    Reschedule,
    RetireWorker,
    RetryKeys,
    StealRequest,
    StealResponse,
    TaskErred,
    Tick,
    ToWorker,
    UpdateData,
    UpdateGraph,
    WorkerStatusChange,
)
from trioscheduler.core.scheduler import SchedulerState


def steal_requests(effects: list[Any]) -> list[tuple[str, Any]]:
    return [
        (e.worker, e.msg.key)
        for e in effects
        if isinstance(e, ToWorker) and isinstance(e.msg, StealRequest)
    ]


def answer(s: SchedulerState, worker: str, key: Any, state: str | None) -> StealResponse:
    """The victim's answer, echoing the request's stimulus id as the worker core does."""
    pending = s.steals.get(key)
    sid = pending.stimulus_id if pending is not None else "no-request"
    return StealResponse(sid, 2.0, worker, key, state)


def loaded(n: int = 6, **kw: Any) -> SchedulerState:
    """A has one thread and ``n`` tasks; B (two threads) joins idle. Without queuing:
    queued root tasks would never pile up on A."""
    s = cluster((A, 1), worker_saturation=math.inf)
    s.handle(
        ev(UpdateGraph, "c", [spec(f"t-{i}", **kw) for i in range(n)], [f"t-{i}" for i in range(n)])
    )
    s.handle(ev(AddWorker, B, 2))
    return s


def test_steal_accepted_refused_and_late() -> None:
    s = loaded()
    newest = list(reversed(s.workers[A].processing))
    eff = s.handle(ev(Tick, now=1.0))
    # last assigned first (least likely started), as many as B has free slots
    assert steal_requests(eff) == [(A, newest[0]), (A, newest[1])]
    first, second, third = newest[:3]
    assert set(s.steals) == {first, second}
    assert s.handle(ev(Tick, now=1.5)) == []  # B's slots are reserved meanwhile

    eff = s.handle(answer(s, A, first, "ready"))
    assert computes(eff) == [(B, first)]
    assert states(s)[first] == "processing" and s.tasks[first].processing_on == B
    assert s.story(first)[-1][1:3] == ("processing", "processing")

    eff = s.handle(answer(s, A, second, "executing"))
    assert eff == [] and s.tasks[second].processing_on == A

    # late / duplicate / wrong-worker answers are ignored
    assert s.handle(answer(s, A, first, "ready")) == []
    assert s.handle(answer(s, B, third, "ready")) == []
    assert s.tasks[first].processing_on == B and s.tasks[third].processing_on == A

    eff = s.handle(ev(Tick, now=2.0))  # B has one free slot again
    assert len(steal_requests(eff)) == 1


def input_held_by_a_third_worker() -> tuple[SchedulerState, Any]:
    """Tasks reading ``x`` pile up on A (one thread); B (idle) is asked to take one; then
    C, idle with eight threads, gets a replica of ``x`` before the victim answers."""
    s = cluster((A, 1), worker_saturation=math.inf)
    s.handle(ev(UpdateData, "c", {"x": [A]}, {"x": 1000}))
    s.handle(ev(UpdateGraph, "c", [spec(f"t-{i}", ("x",)) for i in range(6)], [f"t-{i}" for i in range(6)]))
    s.handle(ev(AddWorker, B, 2))
    s.handle(ev(Tick, now=1.0))
    key = next(iter(s.steals))
    assert s.steals[key].thief == B
    s.handle(ev(AddWorker, C, 8))
    s.handle(ev(AddKeys, C, {"x": 1000}))
    return s, key


def test_steal_confirmed_moves_the_task_to_the_thief() -> None:
    s, key = input_held_by_a_third_worker()
    eff = s.handle(answer(s, A, key, "ready"))
    assert computes(eff) == [(B, key)]  # the victim dropped it as asked: it runs on B
    assert frees(eff) == []


@pytest.mark.parametrize("state", ["released", None, "fetch", "flight", "missing"])
def test_steal_answered_released_or_unknown_places_the_task_again(state: str | None) -> None:
    """As dask's ``move_task_confirm``: a victim that does not hold the task queued
    (released, unknown, only fetching the key) voids the plan the steal was made on;
    the task is placed afresh, here on C, which holds its input and is idle, rather
    than sent to the thief, which would have to fetch ``x``."""
    s, key = input_held_by_a_third_worker()
    eff = s.handle(answer(s, A, key, state))
    assert computes(eff) == [(C, key)]
    assert frees(eff) == [(A, [key])]  # the victim is told the task is not its own
    assert s.tasks[key].processing_on == C
    assert [e[1:3] for e in s.story(key)[-2:]] == [("processing", "waiting"), ("waiting", "processing")]
    assert key not in s.steals and s.workers[B].incoming_steals == len(s.steals)


@pytest.mark.parametrize("state", ["executing", "long-running", "memory", "error", "cancelled", "resumed"])
def test_steal_refused_leaves_the_task_on_the_victim(state: str) -> None:
    s, key = input_held_by_a_third_worker()
    assert s.handle(answer(s, A, key, state)) == []
    assert s.tasks[key].processing_on == A and s.workers[B].incoming_steals == len(s.steals)


def test_answer_to_an_earlier_request_is_ignored() -> None:
    s = loaded()
    s.handle(ev(Tick, now=1.0))
    key = next(iter(s.steals))
    old = s.steals[key].stimulus_id
    s.handle(ev(Reschedule, A, key))  # the victim gave it back; it is sent out again
    assert key not in s.steals
    stale = StealResponse(old, 2.0, A, key, "ready")
    owner = s.tasks[key].processing_on
    assert s.handle(stale) == []
    assert s.tasks[key].processing_on == owner


def test_answer_after_task_finished_on_victim_is_ignored() -> None:
    s = loaded()
    s.handle(ev(Tick, now=1.0))
    key = next(iter(s.steals))
    s.handle(finished(A, key))
    assert key not in s.steals and s.workers[B].incoming_steals == 1
    assert s.handle(answer(s, A, key, "memory")) == []
    assert states(s)[key] == "memory"


def test_steal_to_thief_that_died_reschedules() -> None:
    s = loaded()
    s.handle(ev(Tick, now=1.0))
    key = next(iter(s.steals))
    s.handle(ev(RemoveWorker, B))
    eff = s.handle(answer(s, A, key, "ready"))
    assert computes(eff) == [(A, key)]
    assert s.tasks[key].processing_on == A


def test_thief_leaves_and_rejoins_before_the_answer() -> None:
    s = loaded()
    s.handle(ev(Tick, now=1.0))
    key = next(iter(s.steals))
    s.handle(ev(RemoveWorker, B))
    s.handle(ev(AddWorker, B, 2))
    eff = s.handle(answer(s, A, key, "ready"))
    assert s.workers[B].incoming_steals == 0
    assert len(computes(eff)) == 1 and states(s)[key] == "processing"


def test_victim_dies_with_pending_steal() -> None:
    s = loaded()
    s.handle(ev(Tick, now=1.0))
    s.handle(ev(RemoveWorker, A))
    assert s.steals == {} and s.workers[B].incoming_steals == 0
    assert all(ts.processing_on == B for ts in s.tasks.values())


def test_stealing_respects_restrictions() -> None:
    s = loaded(workers=[A])
    assert steal_requests(s.handle(ev(Tick, now=1.0))) == []
    s2 = cluster()
    s2.handle(ev(AddWorker, A, 1, resources={"GPU": 1}))
    s2.handle(
        ev(
            UpdateGraph,
            "c",
            [spec(f"g-{i}", resources={"GPU": 1}) for i in range(4)],
            [f"g-{i}" for i in range(4)],
        )
    )
    s2.handle(ev(AddWorker, B, 2))
    assert steal_requests(s2.handle(ev(Tick, now=1.0))) == []
    s2.handle(ev(AddWorker, C, 2, resources={"GPU": 4}))
    assert [w for w, _ in steal_requests(s2.handle(ev(Tick, now=2.0)))] == [A, A]
    assert {p.thief for p in s2.steals.values()} == {C}


def test_no_steal_when_transfer_costs_more_than_it_saves() -> None:
    s = cluster((A, 1))
    s.handle(ev(UpdateData, "c", {"big": [A]}, {"big": 10**9}))  # 10 s at 100 MB/s
    s.handle(
        ev(
            UpdateGraph,
            "c",
            [spec(f"t-{i}", ("big",)) for i in range(6)],
            [f"t-{i}" for i in range(6)],
        )
    )
    s.handle(ev(AddWorker, B, 2))
    assert steal_requests(s.handle(ev(Tick, now=1.0))) == []


def test_steal_disabled() -> None:
    s = cluster((A, 1), steal=False)
    s.handle(ev(UpdateGraph, "c", [spec(f"t-{i}") for i in range(6)], [f"t-{i}" for i in range(6)]))
    s.handle(ev(AddWorker, B, 2))
    assert steal_requests(s.handle(ev(Tick, now=1.0))) == []


def test_paused_worker_is_a_victim() -> None:
    s = cluster((A, 2))
    s.handle(ev(UpdateGraph, "c", [spec("t-0"), spec("t-1")], ["t-0", "t-1"]))
    s.handle(ev(WorkerStatusChange, A, "paused"))
    s.handle(ev(AddWorker, B, 2))
    assert sorted(steal_requests(s.handle(ev(Tick, now=1.0)))) == [(A, "t-0"), (A, "t-1")]


# ------------------------------------------------------------------ random cluster


class FakeCluster:
    """Just enough of the worker shells to run the scheduler core to completion."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.s = SchedulerState(validate=True, allowed_failures=100)
        self.pending: dict[str, dict[Any, None]] = {}
        self.steal_asks: list[StealResponse] = []
        self.replicas: list[tuple[str, Any]] = []
        self.n_workers = 0
        self.now = 0.0

    def send(self, *events: Any) -> None:
        for e in self.s.handle(*events):
            if isinstance(e, CloseWorker):
                self.pending.pop(e.worker, None)
            if not isinstance(e, ToWorker) or e.worker not in self.pending:
                continue
            msg = e.msg
            if isinstance(msg, ComputeTask):
                self.pending[e.worker][msg.key] = None
            elif isinstance(msg, FreeKeys):
                for k in msg.keys:
                    self.pending[e.worker].pop(k, None)
            elif isinstance(msg, StealRequest):
                # the worker decides when the request arrives (in order with the
                # ComputeTask/FreeKeys before it); the answer travels back later
                ok = msg.key in self.pending[e.worker] and self.rng.random() < 0.5
                if ok:
                    del self.pending[e.worker][msg.key]
                state = "ready" if ok else "executing"
                self.steal_asks.append(
                    StealResponse(msg.stimulus_id, self.now, e.worker, msg.key, state)
                )
            elif isinstance(msg, AcquireReplicas):
                self.replicas.extend((e.worker, k) for k in msg.who_has)

    def add_worker(self) -> None:
        self.n_workers += 1
        addr = f"tcp://w{self.n_workers}"
        self.pending[addr] = {}
        self.send(ev(AddWorker, addr, self.rng.randint(1, 3), now=self.now))

    def step(self, faults: bool) -> bool:
        rng = self.rng
        self.now += 0.1
        busy = [w for w, p in self.pending.items() if p]
        choice = rng.random()
        if faults and choice < 0.05 and len(self.pending) > 1:
            w = rng.choice(sorted(self.pending))
            del self.pending[w]
            self.send(ev(RemoveWorker, w, now=self.now))
        elif faults and choice < 0.08:
            self.add_worker()
        elif faults and choice < 0.1 and len(self.pending) > 1:
            self.send(ev(RetireWorker, rng.choice(sorted(self.pending)), now=self.now))
        elif choice < 0.2:
            self.send(ev(Tick, now=self.now))
        elif self.steal_asks and choice < 0.35:
            self.send(self.steal_asks.pop(rng.randrange(len(self.steal_asks))))
        elif self.replicas and choice < 0.45:
            w, k = self.replicas.pop()
            if w in self.pending and k in self.s.tasks and self.s.tasks[k].state == "memory":
                self.send(ev(AddKeys, w, {k: 1}, now=self.now))
        elif faults and choice < 0.6:
            self.chaos(rng.random())
        elif busy:
            w = rng.choice(busy)
            k = rng.choice(list(self.pending[w]))
            del self.pending[w][k]
            if faults and rng.random() < 0.05:
                self.send(ev(TaskErred, w, k, b"e", b"t", "flaky", now=self.now))
            else:
                self.send(finished(w, k, nbytes=rng.randint(1, 1000), now=self.now))
        else:
            return bool(self.steal_asks or self.replicas)
        return True

    def chaos(self, r: float) -> None:
        """Client and worker events that are rare in real life but must be safe."""
        rng, s, now = self.rng, self.s, self.now
        processing = sorted((k for k, ts in s.tasks.items() if ts.state == "processing"), key=repr)
        in_memory = sorted((k for k, ts in s.tasks.items() if ts.state == "memory"), key=repr)
        clients = sorted(s.clients)
        if r < 0.1 and clients:
            c = rng.choice(clients)
            wants = sorted(s.clients[c].wants, key=repr)
            if wants:
                self.send(ev(ClientReleasesKeys, c, [rng.choice(wants)], now=now))
        elif r < 0.2 and clients:
            c = rng.choice(clients)
            wants = sorted(s.clients[c].wants, key=repr)
            if wants:
                force = rng.random() < 0.3
                self.send(ev(CancelKeys, c, [rng.choice(wants)], force=force, now=now))
        elif r < 0.3 and clients:
            keys = sorted((k for k, ts in s.tasks.items() if ts.state == "erred"), key=repr)
            if keys:
                self.send(ev(RetryKeys, rng.choice(clients), [rng.choice(keys)], now=now))
        elif r < 0.4 and clients and s.tasks:
            key = rng.choice(sorted(s.tasks, key=repr))
            self.send(ev(ClientDesiresKeys, rng.choice(clients), [key], now=now))
        elif r < 0.5 and self.pending:
            w = rng.choice(sorted(self.pending))
            status = "paused" if rng.random() < 0.5 else "running"
            self.send(ev(WorkerStatusChange, w, status, now=now))
        elif r < 0.6 and in_memory and self.pending:
            k = rng.choice(in_memory)
            holder = rng.choice(sorted(s.tasks[k].who_has))
            self.send(ev(MissingData, rng.choice(sorted(self.pending)), k, holder, now=now))
        elif r < 0.7 and processing:
            k = rng.choice(processing)
            self.send(ev(LongRunning, s.tasks[k].processing_on, k, now=now))
        elif r < 0.8 and processing:
            k = rng.choice(processing)
            w = s.tasks[k].processing_on or ""
            self.pending.get(w, {}).pop(k, None)
            self.send(ev(Reschedule, w, k, now=now))
        elif r < 0.9 and self.pending:
            key = f"scattered-{self.now:.1f}"
            w = rng.choice(sorted(self.pending))
            self.send(ev(UpdateData, "scatter", {key: [w]}, {key: 10}, now=now))
        elif self.pending:
            w = rng.choice(sorted(self.pending))
            self.send(
                ev(ReleaseWorkerData, w, sorted(s.workers[w].has_what, key=repr)[:1], now=now)
            )

    def settle(self) -> None:
        """Stop faults: every worker runs again, and at least one exists."""
        if not self.pending:
            self.add_worker()
        for w in sorted(self.pending):
            self.send(ev(WorkerStatusChange, w, "running", now=self.now))


@pytest.mark.parametrize("seed", range(int(os.environ.get("SCHED_SEEDS", "12"))))
def test_random_cluster_runs_to_completion(seed: int) -> None:
    fc = FakeCluster(seed)
    rng = fc.rng
    for _ in range(3):
        fc.add_worker()
    keys: list[str] = []
    for g in range(3):
        layer: list[str] = []
        specs = []
        for i in range(30):
            key = f"k{g}-{i}"
            deps = rng.sample(keys[-20:], k=min(len(keys[-20:]), rng.randint(0, 3)))
            specs.append(spec(key, tuple(deps), retries=5))
            layer.append(key)
        keys.extend(layer)
        wanted = rng.sample(layer, 10)
        fc.send(ev(UpdateGraph, f"c{g}", specs, wanted, now=fc.now))
        for _ in range(150):
            fc.step(faults=True)
    fc.settle()
    for _ in range(20_000):
        if not fc.step(faults=False):
            break
    s = fc.s
    for cs in s.clients.values():
        for key in cs.wants:
            assert s.tasks[key].state in ("memory", "erred"), (key, s.tasks[key].state)
    assert not s.unrunnable


def test_steals_take_the_lowest_priority_tasks_first() -> None:
    """Not the most recently assigned: the ones the victim would start last."""
    s = cluster((A, 1), worker_saturation=math.inf)
    order = {"t-0": 0, "t-1": 9, "t-2": 8, "t-3": 1, "t-4": 2, "t-5": 3}
    specs = [spec(k, order=o) for k, o in order.items()]
    s.handle(ev(UpdateGraph, "c", specs, list(order)))
    # the most recently assigned would be t-0 (the best, running) and t-1
    assert list(s.workers[A].processing)[-2:] == ["t-1", "t-0"]
    s.handle(ev(AddWorker, B, 2))
    eff = s.handle(ev(Tick, now=1.0))
    assert steal_requests(eff) == [(A, "t-1"), (A, "t-2")]
