"""Both cores decide alike under any PYTHONHASHSEED.

A recorded log is replayed in processes with different hash seeds (so every ``set`` of
str keys or addresses iterates in another order) and the effects/instructions each core
emits, dumped with ``messages.dump``, must be identical, event by event.
"""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from trioscheduler.core import recorder
from trioscheduler.core.simulator import ALWAYS, ClusterSimulator, SimTask, layered_graph

_REPLAY = """
import pickle, sys
from trioscheduler.core import messages, recorder
logs = pickle.loads(open(sys.argv[1], "rb").read())
out = []
for packed in logs:
    kind, kwargs, records = recorder.split_log(recorder.unpack_log(packed))
    core = recorder.KINDS[kind](**kwargs)
    for group in recorder.batches(records):
        out.append([messages.dump(e) for e in core.handle(*map(messages.load, group))])
open(sys.argv[2], "wb").write(pickle.dumps(out))
"""


def busy_run(seed: int, steps: int = 500) -> ClusterSimulator:
    """A recorded run rich in multi-element sets: keys wanted by several clients, data
    replicated on several workers, retirements, lost workers, cancels and removed
    clients (the places where set order could leak into a decision)."""
    rng = random.Random(seed)
    sim = ClusterSimulator(record=True, validate=True)
    for _ in range(4):
        sim.add_worker(nthreads=2, memory_limit=4000)
    graph = layered_graph(80, 10, rng, nbytes=300)
    graph[7].fail_attempts = ALWAYS
    graph[12].retries = 1
    graph[12].fail_attempts = 1
    wanted = [t.key for t in graph[-10:]] + [graph[7].key]
    sim.submit("c0", graph, wanted)
    sim.submit("c1", [SimTask(("t", 1), [graph[0].key, graph[1].key])], [("t", 1)])
    sim.desire("c1", [t.key for t in graph[-6:]])
    sim.desire("c2", [t.key for t in graph[-3:]])
    for _ in range(steps):
        r = rng.random()
        if r < 0.45 and sim.nonempty_queues():
            sim.deliver(*rng.choice(sim.nonempty_queues()), n=rng.randint(1, 4))
        elif r < 0.65 and sim.running_tasks():
            sim.finish(*rng.choice(sim.running_tasks()))
        elif r < 0.8 and sim.pending_gathers():
            addr, peer = rng.choice(sim.pending_gathers())
            sim.gather(addr, peer, fail=rng.random() < 0.1)
        elif r < 0.85:
            sim.tick()
        elif r < 0.87 and len(sim.workers) > 2:
            sim.retire_worker(rng.choice(sorted(sim.workers)))
        elif r < 0.89 and len(sim.workers) > 2:
            sim.lose_worker(rng.choice(sorted(sim.workers)), flush=rng.random() < 0.5)
        elif r < 0.92:
            sim.add_worker(nthreads=rng.randint(1, 3), memory_limit=4000)
        elif r < 0.93 and sim.wants.get("c0"):
            sim.cancel("c0", [rng.choice(sorted(sim.wants["c0"], key=repr))], force=True)
        elif r < 0.94 and "c2" in sim.wants:
            sim.remove_client("c2")
        elif r < 0.97 and sim.pending_writes():
            sim.finish_writes(rng.choice(sorted(sim.pending_writes())), rng.choice([1, None]))
    sim.stop_faults()
    sim.run_to_completion()
    return sim


def _replay_in(seed: str, logs: Path, out: Path) -> list[list[Any]]:
    env = {**os.environ, "PYTHONHASHSEED": seed}
    subprocess.run([sys.executable, "-c", _REPLAY, str(logs), str(out)], env=env, check=True)
    result: list[list[Any]] = pickle.loads(out.read_bytes())
    return result


def test_effects_do_not_depend_on_the_hash_seed(tmp_path: Path) -> None:
    logs: list[bytes] = []
    for seed in range(3):
        sim = busy_run(seed)
        logs.append(recorder.pack_log(sim.scheduler_log))
        logs.extend(recorder.pack_log(log) for log in sim.worker_logs.values())
    data = tmp_path / "logs.pickle"
    data.write_bytes(pickle.dumps(logs))
    first = _replay_in("1", data, tmp_path / "a.pickle")
    assert sum(len(effects) for effects in first) > 300, "too quiet to prove anything"
    for seed in ("2", "3"):
        other = _replay_in(seed, data, tmp_path / f"{seed}.pickle")
        assert len(other) == len(first)
        for i, (a, b) in enumerate(zip(first, other, strict=True)):
            assert a == b, f"event {i}: effects differ between hash seeds 1 and {seed}"
