"""A scheduler restarted from its log (issue 18): the file format, the core's
reconciliation, and the shell replaying it. Across processes with kill -9:
``tests/test_recovery_processes.py``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from trioscheduler.client.client import Client
from trioscheduler.core import messages as m
from trioscheduler.core import recorder
from trioscheduler.core.recorder import Recorder, replay, snapshot
from trioscheduler.server import event_log
from trioscheduler.server.event_log import EventLogWriter, LogError
from trioscheduler.server.scheduler import Scheduler
from trioscheduler.server.worker import Worker


async def wait_until(predicate: Any) -> None:
    while not predicate():  # noqa: ASYNC110 - another component's state, no event to wait on
        await trio.sleep(0.01)


def _spec(key: str, deps: list[str] = (), **kw: object) -> m.TaskSpec:  # type: ignore[assignment]
    return m.TaskSpec(key, list(deps), f"run-{key}".encode(), **kw)  # type: ignore[arg-type]


def _write(path: Path, batches: list[list[object]], fsync_interval: float | None = 1.0) -> None:
    w = EventLogWriter.create(
        path, recorder.header("scheduler", {"validate": True}), fsync_interval
    )
    for b in batches:
        w.append([m.dump(ev) for ev in b])
    w.close()


EVENTS = [
    [m.AddWorker("a", 0.0, "w1", 2)],
    [m.AddClient("c", 0.1, "c1")],
    [m.UpdateGraph("u", 0.2, "c1", [_spec("x"), _spec("y", ["x"])], ["y"])],
]


def test_a_log_file_replays_the_state(tmp_path: Path) -> None:
    path = tmp_path / "log"
    _write(path, EVENTS)
    rec = Recorder.scheduler(validate=True)
    for b in EVENTS:
        rec.handle(*b)
    contents = event_log.read_log(path)
    assert contents.frames == 4 and contents.torn_bytes == 0
    assert snapshot(replay(contents.records)) == snapshot(rec)
    assert contents.header is not None and recorder.header_meta(contents.header)["version"]


@pytest.mark.parametrize("cut", [1, 5, 9, 20])
def test_a_torn_last_frame_is_dropped_and_cut_off_before_appending(
    tmp_path: Path, cut: int
) -> None:
    """kill -9 in the middle of a write: the partial frame is not replayed, and the next
    run appends after the last whole frame."""
    path = tmp_path / "log"
    _write(path, EVENTS)
    whole = path.stat().st_size
    with path.open("ab") as f:  # the start of one more frame, cut short
        f.write(event_log.frame([m.dump(m.AddClient("d", 0.3, "c2"))])[:cut])
    contents = event_log.read_log(path)
    assert contents.frames == 4 and contents.torn_bytes == cut and contents.good_bytes == whole
    w = EventLogWriter.append_to(path, contents, None)
    w.append([m.dump(m.AddClient("e", 0.4, "c3"))])
    w.close()
    again = event_log.read_log(path)
    assert again.torn_bytes == 0 and again.frames == 5
    assert set(replay(again.records).clients) == {"c1", "c3"}


def test_held_frames_go_in_one_write_at_release(tmp_path: Path) -> None:
    path = tmp_path / "log"
    w = EventLogWriter.create(path, recorder.header("scheduler", {}), None)
    size = path.stat().st_size
    w.hold()
    for b in EVENTS:
        w.record(b)
    assert path.stat().st_size == size  # nothing written while held
    w.release()
    assert path.stat().st_size > size
    w.close()
    assert event_log.read_log(path).frames == 4


def test_damage_before_the_last_frame_is_an_error_naming_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "log"
    _write(path, EVENTS)
    data = bytearray(path.read_bytes())
    data[len(event_log.MAGIC) + 12] ^= 0xFF  # inside the header frame's payload
    path.write_bytes(bytes(data))
    with pytest.raises(LogError, match="damaged frame at byte 8"):
        event_log.read_log(path)


def test_not_a_log_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"\xc1\xc1 certainly not msgpack")
    with pytest.raises(LogError, match="not a trioscheduler event log"):
        event_log.read_log(path)


def test_fsync_every_write_and_never(tmp_path: Path) -> None:
    for interval in (0.0, None):
        path = tmp_path / f"log-{interval}"
        _write(path, EVENTS, interval)
        assert event_log.read_log(path).frames == 4
    with pytest.raises(ValueError, match="fsync_interval"):
        EventLogWriter(tmp_path / "x", os.open(os.devnull, os.O_WRONLY), -1.0)


# ---------------------------------------------------------------------------- the core


def _crashed_state() -> Recorder:
    """Two workers; x in memory on w1, y in memory on w2, z processing on w1, z2 queued
    behind; a client wants z and z2; another client wants x."""
    rec = Recorder.scheduler(validate=True)
    rec.handle(m.AddWorker("a1", 0.0, "w1", 1), m.AddWorker("a2", 0.0, "w2", 1))
    rec.handle(m.AddClient("c", 0.0, "c1"), m.AddClient("c", 0.0, "c2"))
    rec.handle(
        m.UpdateGraph(
            "u", 0.1, "c1",
            [_spec("x", workers=["w1"]), _spec("y", workers=["w2"]),
             _spec("z", ["x", "y"], workers=["w1"], allow_other_workers=True), _spec("z2", ["z"])],
            ["z2"],
        )
    )  # fmt: skip
    s = rec.state
    for key in ("x", "y"):
        w = s.tasks[key].processing_on
        rec.handle(m.TaskFinished(f"f-{key}", 0.2, w, key, 10))
    rec.handle(m.ClientDesiresKeys("d", 0.2, "c2", ["x"]))
    assert s.tasks["z"].state == "processing"
    assert s.tasks["x"].who_has == {"w1"} and s.tasks["y"].who_has == {"w2"}
    return rec


def test_recovered_reschedules_processing_and_keeps_replicas_of_returning_workers() -> None:
    crashed = _crashed_state()
    state = replay(crashed.log)
    z_on = crashed.state.tasks["z"].processing_on
    x_on = next(iter(crashed.state.tasks["x"].who_has))
    y_on = next(iter(crashed.state.tasks["y"].who_has))
    effects = state.handle(m.Recovered("r", 100.0, 5.0, [m.FIRE_AND_FORGET]))
    assert not any(type(e) is m.ToWorker and type(e.msg) is m.ComputeTask for e in effects)
    assert state.tasks["z"].state in ("waiting", "no-worker")
    assert state.tasks["z"].suspicious == 0  # the scheduler died, not the worker
    assert {ws.status for ws in state.workers.values()} == {"recovering"}
    # the worker holding x comes back with it (and the other one never does)
    effects = state.handle(m.AddWorker("back", 100.5, x_on, 1, data={"x": 10}))
    assert state.tasks["x"].state == "memory" and state.tasks["x"].who_has == {x_on}
    # y's holder is still awaited: y stays in memory there, z runs on the returned worker
    assert state.tasks["y"].state == "memory"
    computes = [
        e.msg.key for e in effects if type(e) is m.ToWorker and type(e.msg) is m.ComputeTask
    ]
    assert computes == ["z"] and state.tasks["z"].processing_on == x_on
    assert z_on in state.workers
    # the grace ends: y's holder is gone, y is recomputed from lineage; c2 never came back
    state.handle(m.AddClient("c", 101.0, "c1"), m.Tick("t", 106.0))
    assert y_on not in state.workers
    assert "c2" not in state.clients and "c1" in state.clients
    assert state.tasks["y"].state in ("processing", "waiting", "no-worker")
    assert state.recovery is None


def test_a_returning_worker_that_lost_a_value_gets_it_recomputed() -> None:
    crashed = _crashed_state()
    state = replay(crashed.log)
    state.handle(m.Recovered("r", 100.0, 5.0, []))
    x_on = next(iter(crashed.state.tasks["x"].who_has))
    state.handle(m.AddWorker("back", 100.5, x_on, 1, data={}))  # came back empty
    assert state.tasks["x"].state in ("processing", "waiting", "released")
    assert x_on not in state.tasks["x"].who_has


def test_everyone_back_ends_the_recovery() -> None:
    crashed = _crashed_state()
    state = replay(crashed.log)
    state.handle(m.Recovered("r", 100.0, 5.0, []))
    for addr in sorted(crashed.state.workers):
        held = {k: 10 for k in crashed.state.workers[addr].has_what}
        state.handle(m.AddWorker("back", 100.5, addr, 1, data=held))
    state.handle(m.AddClient("c", 100.6, "c1"), m.AddClient("c", 100.6, "c2"))
    assert state.recovery is None
    assert state.tasks["x"].state == state.tasks["y"].state == "memory"
    assert state.tasks["z"].state == "processing"


def test_recovered_is_recorded_and_replays() -> None:
    crashed = _crashed_state()
    log = list(crashed.log)
    state = replay(log)
    state.handle(m.Recovered("r", 100.0, 5.0, []))
    log.append(m.dump(m.Recovered("r", 100.0, 5.0, [])))
    assert snapshot(replay(log)) == snapshot(state)


# ---------------------------------------------------------------------------- the shell


async def _serve(address: str, log: Path, stop: trio.Event, *, task_status: Any) -> None:
    async with Scheduler(address, recover_from=log, recovery_grace=30) as s:
        task_status.started(s)
        await stop.wait()


def slow_inc(x: int, delay: float = 0.0) -> int:
    time.sleep(delay)
    return x + 1


async def test_a_restarted_scheduler_finishes_the_graph_and_keeps_datasets(tmp_path: Path) -> None:
    """Stopped (in order) mid-graph and started again from its log at the same address:
    the client's pending future completes, values the worker kept are not recomputed,
    a published dataset is still there."""
    log = tmp_path / "scheduler.log"
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            stop = trio.Event()
            s: Scheduler = await nursery.start(_serve, "tcp://127.0.0.1:0", log, stop)
            address = s.address
            async with (
                Worker(address, nthreads=1, memory_limit=0, death_timeout=30) as w,
                Client(address, asynchronous=True) as c,
            ):
                a = c.submit(slow_inc, 1, key="a")
                assert await a == 2
                await c.publish_dataset(kept=a)
                chain = a
                for i in range(20):
                    chain = c.submit(slow_inc, chain, 0.02, key=f"chain-{i}")
                await wait_until(
                    lambda: (
                        "chain-3" in w.state.tasks and w.state.tasks["chain-3"].state == "memory"
                    )
                )
                stop.set()  # the scheduler stops; the worker and the client wait for it
                await wait_until(lambda: w._batched is None)
                stop = trio.Event()
                s2: Scheduler = await nursery.start(_serve, address, log, stop)
                assert s2.recovered and "a" in s2.state.tasks
                assert await chain == 22
                assert c._link.reconnections == 1 and w.reconnections == 1
                assert s2.state.tasks["a"].state == "memory"
                assert "kept" in await c.list_datasets()
                assert await (await c.get_dataset("kept")) == 2
                story = [t for t in s2.state.story("chain-0") if t[2] == "processing"]
                assert len(story) <= 1  # chain-0 was done before the stop: not rerun
            stop.set()


# ---------------------------------------------------------------------------- recorders


def test_local_cluster_record_logs_every_core_and_the_logs_replay(tmp_path: Path) -> None:
    """``LocalCluster(record=DIR)``: the scheduler's and each worker's events; each log
    replays to the state its core ended in (in-process workers, to compare with)."""
    from trioscheduler import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, processes=False, record=tmp_path, dashboard_address=None) as cluster,
        Client(cluster) as c,
    ):
        assert c.submit(sum, c.map(slow_inc, range(20))).result() == sum(range(1, 21))
        workers = list(cluster.workers.values())
        scheduler = cluster.scheduler
    assert {p.name for p in tmp_path.iterdir()} == {
        "scheduler.log", *(f"worker-{w.name}.log" for w in workers)
    }
    for w in workers:
        log = event_log.load_log(tmp_path / f"worker-{w.name}.log")
        assert log[0][2] == "worker" and recorder.header_meta(log[0])["version"]
        assert snapshot(replay(log)) == snapshot(w.state)
    assert snapshot(replay(event_log.load_log(tmp_path / "scheduler.log"))) == snapshot(scheduler.state)


def test_worker_processes_record_through_their_nanny(tmp_path: Path) -> None:
    from trioscheduler import Client, LocalCluster

    with (
        LocalCluster(n_workers=1, processes=True, record=tmp_path, dashboard_address=None) as cluster,
        Client(cluster) as c,
    ):
        assert c.submit(slow_inc, 1).result() == 2
        (name,) = [w.name for w in cluster.workers.values()]
    state = replay(event_log.load_log(tmp_path / f"worker-{name}.log"))
    assert state.address.startswith("tcp://")


# ---------------------------------------------------------------------------- simulated


@pytest.mark.parametrize("seed", range(12))
def test_a_simulated_scheduler_restarted_from_its_log_finishes_right(seed: int) -> None:
    """The machine's rule, on fixed random graphs: crash the scheduler at a random
    moment (everything in flight to or from it lost; every third time a worker dies with
    it), restart it from its log; every wanted key ends with the right value."""
    import random

    from trioscheduler.core.sim_restart import record_scheduler, restart_scheduler
    from trioscheduler.core.simulator import ClusterSimulator, layered_graph, sinks

    rng = random.Random(seed)
    sim = ClusterSimulator(validate=True)
    record_scheduler(sim)
    workers = [sim.add_worker(nthreads=2) for _ in range(3)]
    tasks = layered_graph(60, 6, rng)
    sim.submit("c", tasks, sinks(tasks)[:5])
    for _ in range(rng.randrange(1, 40)):
        if queues := sim.nonempty_queues():
            sim.deliver(*rng.choice(queues), 3)
        if running := sim.running_tasks():
            sim.finish(*rng.choice(running))
        if gathers := sim.pending_gathers():
            sim.gather(*rng.choice(gathers))
    dead = [workers[0]] if seed % 3 == 0 else []
    restart_scheduler(sim, 1.0, dead)
    sim.check()
    assert any(type(r) is list and r[0] == "recovered" for r in sim.scheduler_log)
    if dead:
        sim.advance(2.0)
        sim.tick()
        assert workers[0] not in sim.scheduler.workers
    assert not sim.settle()


def test_cli_recovery_options() -> None:
    from trioscheduler.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["scheduler", "--recover-from", "s.log", "--log-fsync-interval", "never"])
    assert (args.recover_from, args.log_fsync_interval, args.recovery_grace) == ("s.log", None, 60.0)
    args = parser.parse_args(["scheduler", "--log-fsync-interval", "0", "--recovery-grace", "2m"])
    assert (args.log_fsync_interval, args.recovery_grace) == (0.0, 120.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["scheduler", "--log-fsync-interval", "-1"])
    with pytest.raises(ValueError, match="record= or recover_from="):
        Scheduler(record="a", recover_from="b")
