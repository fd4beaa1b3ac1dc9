"""The recorder: a log of a core's events replays into an identical state."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest

from trioscheduler.core import messages as m
from trioscheduler.core import recorder
from trioscheduler.core.recorder import Recorder, ReplayError, replay, snapshot
from trioscheduler.core.scheduler import SchedulerState
from trioscheduler.core.simulator import ALWAYS, ClusterSimulator, SimTask, layered_graph
from trioscheduler.server import event_log


def random_run(seed: int, steps: int = 400) -> ClusterSimulator:
    """A recorded cluster run with every kind of step, chosen by a seeded generator."""
    rng = random.Random(seed)
    sim = ClusterSimulator(record=True, validate=True)
    for _ in range(3):
        sim.add_worker(nthreads=2, memory_limit=3000)
    graph = layered_graph(60, 8, rng, nbytes=400)
    graph[5].fail_attempts = 1
    graph[9].fail_attempts = ALWAYS
    graph[11].retries = 1
    graph[11].fail_attempts = 1
    sim.submit("c0", graph, [t.key for t in graph[-8:]] + [graph[9].key])
    sim.submit(
        "c1",
        [SimTask(("tuple", 1), [graph[0].key]), SimTask(b"bytes", [])],
        [("tuple", 1), b"bytes"],
    )
    for _ in range(steps):
        r = rng.random()
        if r < 0.45 and sim.nonempty_queues():
            sim.deliver(*rng.choice(sim.nonempty_queues()), n=rng.randint(1, 3))
        elif r < 0.65 and sim.running_tasks():
            addr, key = rng.choice(sim.running_tasks())
            x = rng.random()
            if x < 0.1:
                sim.secede(addr, key)
            elif x < 0.15:
                sim.reschedule(addr, key)
            else:
                sim.finish(addr, key)
        elif r < 0.8 and sim.pending_gathers():
            addr, peer = rng.choice(sim.pending_gathers())
            sim.gather(addr, peer, fail=rng.random() < 0.2)
        elif r < 0.84:
            sim.tick()
        elif r < 0.87 and sim.workers:
            sim.measure_memory(rng.choice(list(sim.workers)), rng.choice([0, 2200, 2500]))
        elif r < 0.89 and len(sim.workers) > 1:
            sim.lose_worker(rng.choice(list(sim.workers)), flush=rng.random() < 0.5)
        elif r < 0.91:
            sim.add_worker(nthreads=rng.randint(1, 2), memory_limit=3000)
        elif r < 0.93 and sim.wants["c0"]:
            sim.release("c0", [rng.choice(sorted(sim.wants["c0"]))])
        elif r < 0.94 and sim.wants["c0"]:
            sim.cancel("c0", [rng.choice(sorted(sim.wants["c0"]))])
        elif r < 0.98 and sim.pending_writes():
            sim.finish_writes(rng.choice(sim.pending_writes()), rng.choice([1, None]))
    sim.check()
    return sim


def all_logs(sim: ClusterSimulator) -> list[tuple[Any, list[list[Any]]]]:
    """(live state, log) for the scheduler and every worker still alive."""
    pairs: list[tuple[Any, list[list[Any]]]] = [(sim.scheduler, sim.scheduler_log)]
    pairs += [(w.state, sim.worker_logs[a]) for a, w in sim.workers.items()]
    return pairs


@pytest.mark.parametrize("seed", range(4))
def test_replay_rebuilds_every_core_of_a_random_run(seed: int) -> None:
    sim = random_run(seed)
    assert len(sim.scheduler_log) > 50
    for live, log in all_logs(sim):
        assert snapshot(replay(log)) == snapshot(live)


def test_spill_writes_are_recorded_and_replayed() -> None:
    """The spill writer's reports (``SpillWritten``) are logged and replay like any event."""
    sim = random_run(1)
    logs = [log for a, log in sim.worker_logs.items() if a in sim.workers]
    assert any(r[0] == "spill-written" for log in logs for r in log)
    for live, log in all_logs(sim):
        assert snapshot(replay(recorder.unpack_log(recorder.pack_log(log)))) == snapshot(live)


@pytest.mark.parametrize("seed", range(2))
def test_replay_through_msgpack_bytes(seed: int) -> None:
    """Tuple keys survive msgpack (arrays come back as hashable tuples)."""
    sim = random_run(seed, steps=250)
    for live, log in all_logs(sim):
        assert snapshot(replay(recorder.unpack_log(recorder.pack_log(log)))) == snapshot(live)


def test_replay_upto_and_validate() -> None:
    sim = random_run(7, steps=100)
    log = sim.scheduler_log
    partial = replay(log, upto=5, validate=True)
    assert partial.validate is True
    assert partial.generation <= sim.scheduler.generation


def test_recorder_logs_before_the_core_mutates() -> None:
    rec = Recorder.scheduler(steal=False)
    assert rec.log[0] == recorder.header("scheduler", {"steal": False})
    rec.handle(m.AddWorker("a", 0.0, "w1", 1))
    rec.handle(m.UpdateGraph("u", 0.1, "c", [m.TaskSpec("x", [], b"f")], ["x"]))
    assert [type(e) for e in rec.events] == [m.AddWorker, m.UpdateGraph]
    assert rec.state.tasks["x"].state == "processing"
    assert snapshot(replay(rec.log)) == snapshot(rec)


def test_worker_recorder_keeps_its_address() -> None:
    rec = Recorder.worker("w9", nthreads=2, memory_limit=100)
    rec.handle(m.ComputeTask("c", 0.0, "x", b"f", [], {}, {}, (0,)))
    again = replay(rec.log)
    assert again.address == "w9" and again.nthreads == 2
    assert snapshot(again) == snapshot(rec)


def test_a_used_state_cannot_be_wrapped() -> None:
    s = SchedulerState()
    s.handle(m.AddClient("a", 0.0, "c"))
    with pytest.raises(ValueError, match="not handled any event"):
        Recorder(s, {})


def test_headerless_shell_file_replays_as_scheduler(tmp_path: Path) -> None:
    """The format of ``Scheduler(record=PATH)`` before it wrote a header."""
    rec = Recorder.scheduler(allowed_failures=5)
    rec.handle(
        m.AddWorker("a", 0.0, "w1", 2),
        m.UpdateGraph("u", 0.1, "c", [m.TaskSpec(("k", 0), [], b"f")], [("k", 0)]),
    )
    path = tmp_path / "events.msgpack"
    packer = msgpack.Packer(use_bin_type=True)
    path.write_bytes(b"".join(packer.pack(r) for r in rec.log[1:]))
    log = event_log.load_log(path)
    state = replay(log, defaults={"allowed_failures": 5})
    assert state.allowed_failures == 5
    assert snapshot(state) == snapshot(rec)


def test_a_log_written_before_a_record_gained_a_trailing_field_replays() -> None:
    # AddWorker and UpdateData gained ``incarnation(s)`` (session 9): an older log's
    # records stop before it, and the field takes its default.
    rec = Recorder.scheduler()
    rec.handle(
        m.AddWorker("a", 0.0, "w1", 2),
        m.UpdateGraph("u", 0.1, "c", [m.TaskSpec(("k", 0), [], b"f")], [("k", 0)]),
    )
    old = [rec.log[0], *(r[:-1] if r[0] == "add-worker" else r for r in rec.log[1:])]
    assert [len(r) for r in old] != [len(r) for r in rec.log]
    assert snapshot(replay(old)) == snapshot(rec)
    assert m.load(["add-worker", "a", 0.0, "w1", 2]).incarnation is None


def test_bad_logs_are_refused() -> None:
    with pytest.raises(ReplayError, match="unknown state kind"):
        replay([[recorder.HEADER_TAG, recorder.FORMAT_VERSION, "nanny", {}, {}]])
    with pytest.raises(ReplayError, match="unsupported"):
        replay([[recorder.HEADER_TAG, 99, "scheduler", {}]])
    two = [recorder.header("scheduler", {}), recorder.header("scheduler", {})]
    with pytest.raises(ReplayError, match="second header"):
        replay(two)
    with pytest.raises(m.MessageError):
        replay([recorder.header("scheduler", {}), ["no-such-event", 1]])
    with pytest.raises(m.MessageError, match="has 3 fields, expected 4 to 10"):
        replay([recorder.header("scheduler", {}), ["add-worker", "a", 0.0, "w1"]])
    with pytest.raises(m.MessageError, match="has 11 fields, expected 4 to 10"):
        replay([recorder.header("scheduler", {}), ["add-worker", "a", 0.0, "w1", 2, *[None] * 6, "x"]])


_CROSS_PROCESS = """
import pickle, sys
sys.path.insert(0, {tests!r})
from test_recorder import random_run
from trioscheduler.core import recorder
if sys.argv[1] == "record":
    out = []
    for seed in range(3):
        sim = random_run(seed, 200)
        out.append((recorder.pack_log(sim.scheduler_log), recorder.snapshot(sim.scheduler)))
    open(sys.argv[2], "wb").write(pickle.dumps(out))
else:
    runs = pickle.loads(open(sys.argv[2], "rb").read())
    same = [recorder.snapshot(recorder.replay(recorder.unpack_log(log))) == snap for log, snap in runs]
    print(same)
    sys.exit(0 if all(same) else 1)
"""


def test_replay_in_a_process_with_another_hash_seed(tmp_path: Path) -> None:
    script = _CROSS_PROCESS.format(tests=str(Path(__file__).parent))
    data = tmp_path / "runs.pickle"
    env = {**os.environ, "PYTHONHASHSEED": "1"}
    subprocess.run([sys.executable, "-c", script, "record", str(data)], env=env, check=True)
    env["PYTHONHASHSEED"] = "2"
    done = subprocess.run([sys.executable, "-c", script, "replay", str(data)], env=env)
    assert done.returncode == 0, "replay diverged from the recording"


@pytest.mark.parametrize("kind", sorted(recorder.KINDS))
def test_header_defaults_are_the_constructors(kind: str) -> None:
    """A header holds every setting; its defaults are the constructor's (so a replay does
    not depend on the defaults of the code that reads it)."""
    import inspect

    import trioscheduler.core as core

    if core.compiled():  # mypyc's classes show no Python signature
        pytest.skip("needs the interpreted core (an editable install) to read __init__'s defaults")
    params = inspect.signature(recorder.KINDS[kind].__init__).parameters
    defaults = {
        n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty
    }
    assert recorder.DEFAULTS[kind] == defaults


def test_header_carries_all_settings_and_the_version() -> None:
    import trioscheduler

    head = recorder.header("scheduler", {"allowed_failures": 5})
    assert head[3]["allowed_failures"] == 5
    assert head[3]["worker_saturation"] == 1.1  # a default, written out
    assert recorder.header_meta(head) == {"version": trioscheduler.__version__}
    with pytest.raises(ReplayError, match="unknown scheduler settings"):
        recorder.header("scheduler", {"no_such_setting": 1})
    state = replay(recorder.unpack_log(recorder.pack_log([head])))
    assert state.allowed_failures == 5


def test_format_1_headers_still_replay() -> None:
    old = [recorder.HEADER_TAG, 1, "scheduler", {"allowed_failures": 7}]
    assert replay([old]).allowed_failures == 7
