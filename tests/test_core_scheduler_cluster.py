"""Both cores together: the scheduler core drives real ``WorkerState`` cores.

A minimal in-memory "shell": effects are delivered FIFO per destination, ``Execute``
finishes at once, ``GatherDep`` succeeds if the peer holds the keys. It checks the two
cores speak the same protocol (compute, fetch, replicas, free, steal, loss) end to end.
"""

from __future__ import annotations

import itertools
import os
import random
from collections import deque
from typing import Any

import pytest

from trioscheduler.core.messages import (
    AddWorker,
    ClientReleasesKeys,
    Execute,
    ExecuteSuccess,
    GatherDep,
    GatherDepFailure,
    GatherDepSuccess,
    RemoveWorker,
    TaskSpec,
    Tick,
    ToClient,
    ToScheduler,
    ToWorker,
    UpdateData,
    UpdateGraph,
    WorkerUpdateData,
)
from trioscheduler.core.scheduler import SchedulerState
from trioscheduler.core.sim_records import ALWAYS, SimTask
from trioscheduler.core.simulator import ClusterSimulator
from trioscheduler.core.worker import WorkerState

_ids = itertools.count()


class Sim:
    def __init__(
        self,
        n_workers: int,
        nthreads: int = 2,
        seed: int = 0,
        validate: bool = True,
        allowed_failures: int = 3,
    ):
        self.rng = random.Random(seed)
        self.validate = validate
        self.s = SchedulerState(validate=validate, allowed_failures=allowed_failures)
        self.workers: dict[str, WorkerState] = {}
        self.to_sched: deque[Any] = deque()
        self.to_worker: dict[str, deque[Any]] = {}
        self.client_msgs: list[Any] = []
        self.now = 0.0
        for i in range(n_workers):
            self.add_worker(f"tcp://w{i}", nthreads)

    def sid(self) -> str:
        return f"sim-{next(_ids)}"

    def add_worker(self, addr: str, nthreads: int) -> None:
        self.workers[addr] = WorkerState(addr, nthreads=nthreads, validate=self.validate)
        self.to_worker[addr] = deque()
        self.scheduler(AddWorker(self.sid(), self.now, addr, nthreads))

    def lose_worker(self, addr: str) -> None:
        del self.workers[addr]
        del self.to_worker[addr]
        self.scheduler(RemoveWorker(self.sid(), self.now, addr, reason="killed"))

    def scheduler(self, ev: Any) -> None:
        for e in self.s.handle(ev):
            if isinstance(e, ToWorker):
                q = self.to_worker.get(e.worker)
                if q is not None:
                    q.append(e.msg)
            elif isinstance(e, ToClient):
                self.client_msgs.append(e.msg)

    def worker(self, addr: str, ev: Any) -> None:
        ws = self.workers[addr]
        for ins in ws.handle(ev):
            if isinstance(ins, ToScheduler):
                self.to_sched.append(ins.msg)
            elif isinstance(ins, Execute):
                self.to_worker[addr].append(
                    ExecuteSuccess(
                        self.sid(), self.now, ins.key, 8, "int", self.now, self.now + 0.001
                    )
                )
            elif isinstance(ins, GatherDep):
                peer = self.workers.get(ins.peer)
                have = {k: 8 for k in ins.keys if peer is not None and k in peer.in_memory}
                if peer is None:
                    ev2: Any = GatherDepFailure(
                        self.sid(), self.now, ins.peer, list(ins.keys), "gone"
                    )
                else:
                    missing = [k for k in ins.keys if k not in have]
                    ev2 = GatherDepSuccess(self.sid(), self.now, ins.peer, have, missing)
                self.to_worker[addr].append(ev2)

    def run(self, max_steps: int = 1_000_000, chaos: bool = False) -> int:
        steps = 0
        while steps < max_steps:
            queues = [a for a, q in self.to_worker.items() if q]
            if not queues and not self.to_sched:
                return steps
            steps += 1
            self.now += 0.001
            if chaos and self.rng.random() < 0.02:
                self.scheduler(Tick(self.sid(), self.now))
            if self.to_sched and (not queues or self.rng.random() < 0.5):
                self.scheduler(self.to_sched.popleft())
            else:
                addr = self.rng.choice(queues)
                self.worker(addr, self.to_worker[addr].popleft())
        raise AssertionError("simulation did not settle")


def tree_graph(n_leaves: int) -> tuple[list[TaskSpec], str]:
    specs = [TaskSpec(f"leaf-{i}", [], b"f", order=i) for i in range(n_leaves)]
    layer = [s.key for s in specs]
    level = 0
    while len(layer) > 1:
        level += 1
        nxt = []
        for j in range(0, len(layer), 2):
            key = f"sum{level}-{j // 2}"
            specs.append(TaskSpec(key, layer[j : j + 2], b"f", order=len(specs)))
            nxt.append(key)
        layer = nxt
    return specs, layer[0]


def test_tree_reduction_through_both_cores() -> None:
    sim = Sim(4)
    specs, root = tree_graph(128)
    sim.scheduler(UpdateGraph(sim.sid(), 0.0, "c", specs, [root]))
    sim.run()
    assert sim.s.tasks[root].state == "memory"
    assert [type(m).__name__ for m in sim.client_msgs] == ["KeyInMemory"]
    assert all(ts.state == "released" for k, ts in sim.s.tasks.items() if k != root)
    sim.scheduler(ClientReleasesKeys(sim.sid(), sim.now, "c", [root]))
    sim.run()
    assert sim.s.tasks == {}
    assert all(not ws.in_memory for ws in sim.workers.values())


@pytest.mark.parametrize("seed", range(4))
def test_worker_loss_and_stealing_through_both_cores(seed: int) -> None:
    sim = Sim(4, seed=seed)
    specs, root = tree_graph(48)
    sim.scheduler(UpdateGraph(sim.sid(), 0.0, "c", specs, [root]))
    for _ in range(120):
        if not sim.to_sched and not any(sim.to_worker.values()):
            break
        sim.now += 0.001
        if sim.to_sched:
            sim.scheduler(sim.to_sched.popleft())
        addr = sim.rng.choice(sorted(sim.to_worker))
        if sim.to_worker[addr]:
            sim.worker(addr, sim.to_worker[addr].popleft())
    sim.lose_worker(sorted(sim.workers)[seed % 4])
    sim.add_worker("tcp://late", 2)
    sim.run(chaos=True)
    assert sim.s.tasks[root].state == "memory"
    assert {type(m).__name__ for m in sim.client_msgs} <= {"KeyInMemory", "KeyLost"}


@pytest.mark.parametrize("seed", range(int(os.environ.get("SCHED_SEEDS", "6"))))
def test_chaos_through_both_cores(seed: int) -> None:
    """Workers die and join and steals tick while messages interleave at random."""
    rng = random.Random(seed)
    sim = Sim(rng.randint(2, 5), seed=seed, allowed_failures=1000)
    specs, root = tree_graph(rng.choice([16, 32]))
    sim.scheduler(UpdateGraph(sim.sid(), 0.0, "c", specs, [root]))
    late = 0
    for _ in range(3000):
        if not sim.to_sched and not any(sim.to_worker.values()):
            break
        sim.now += 0.001
        r = rng.random()
        busy = [a for a, q in sim.to_worker.items() if q]
        if r < 0.01 and len(sim.workers) > 1:
            sim.lose_worker(rng.choice(sorted(sim.workers)))
        elif r < 0.02:
            late += 1
            sim.add_worker(f"tcp://late{late}", rng.randint(1, 3))
        elif r < 0.06:
            sim.scheduler(Tick(sim.sid(), sim.now))
        elif sim.to_sched and (r < 0.5 or not busy):
            sim.scheduler(sim.to_sched.popleft())
        elif busy:
            addr = rng.choice(busy)
            sim.worker(addr, sim.to_worker[addr].popleft())
    sim.run(chaos=True)
    assert sim.s.tasks[root].state == "memory"


def test_scatter_racing_its_free_keys_ends_in_an_error_not_a_hang() -> None:
    """A client that does not number its data updates (``UpdateData`` without ``seqs``;
    ours does, see ``test_a_key_scattered_again_survives_the_free_of_its_released_value``)
    scatters ``d``, releases it and scatters ``d`` again before the worker has read the
    ``FreeKeys`` of the first: the worker then drops the new value. Nothing can recompute
    scattered data, but nothing may hang either: the worker reports the drop
    (``ReleaseWorkerData``), and ``d`` and its dependent err, naming ``d`` and telling the
    user to scatter it again."""
    sim = Sim(1)
    (w,) = sim.workers
    ws = sim.workers[w]

    def scatter() -> None:  # what the client does: put the value there, then tell
        sim.worker(w, WorkerUpdateData(sim.sid(), sim.now, {"d": 100}))
        sim.scheduler(UpdateData(sim.sid(), sim.now, "c", {"d": [w]}, {"d": 100}))

    scatter()
    sim.scheduler(ClientReleasesKeys(sim.sid(), sim.now, "c", ["d"]))
    assert [type(m).__name__ for m in sim.to_worker[w]] == ["FreeKeys"]  # not read yet
    scatter()
    assert "d" in ws.in_memory
    sim.scheduler(UpdateGraph(sim.sid(), sim.now, "c", [TaskSpec("f", ["d"], b"f")], ["f"]))
    sim.run()
    assert "d" not in ws.in_memory  # the stale FreeKeys dropped the new value
    erred = {m.key: m for m in sim.client_msgs if type(m).__name__ == "KeyErred"}
    assert sorted(erred) == ["d", "f"]  # both of the client's futures hear it
    for m in erred.values():
        assert "'d'" in m.exception_text and "Scatter it again" in m.exception_text
    assert sim.s.tasks["f"].state == "erred"



def test_fire_and_forget_and_restart_through_the_simulator() -> None:
    """Both decisions the shell used to make, now the core's, through both cores: a
    fire-and-forget key runs to its outcome and is released; a restart cancels every
    client's keys (the others are told) and leaves nothing running or held."""
    sim = ClusterSimulator(validate=True)
    sim.add_worker()
    sim.add_worker()
    graph = [SimTask("a"), SimTask("b", ["a"]), SimTask("bad", fail_attempts=ALWAYS)]
    sim.submit("c", graph, ["b", "bad"])
    sim.fire_and_forget(["b", "bad"])
    sim.release("c", ["b", "bad"])  # the futures go; the work must still happen
    assert not sim.settle()
    assert sim.client_msgs.get("c") is None  # c had released them: told nothing
    moves = {(k, start, finish) for k, start, finish, *_ in sim.scheduler.story("b", "bad")}
    assert {("b", "processing", "memory"), ("bad", "processing", "erred")} <= moves
    assert "b" not in sim.scheduler.tasks and "bad" not in sim.scheduler.tasks  # released

    sim.submit("c", [SimTask("x"), SimTask("y", ["x"])], ["y"])
    sim.submit("d", [SimTask("z", ["x"])], ["z", "y"])
    sim.restart_clients("c")
    assert not sim.settle()
    assert {k: type(m).__name__ for k, m in sim.client_msgs["d"].items()} == {
        "y": "KeyCancelled", "z": "KeyCancelled",
    }  # fmt: skip
    assert "y" not in sim.client_msgs.get("c", {})  # the requester is not told
    assert sim.scheduler.tasks == {}
    assert all(not w.state.tasks for w in sim.workers.values())
