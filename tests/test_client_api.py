"""The rest of dask's Client on a real LocalCluster of worker processes: which client is
current, the executor, diagnostics (processing, call stacks, profile, story, task stream,
logs, versions, dumps, benchmarks), events and topics, forwarded logging, metadata.

Several methods share one module-scoped cluster to keep the file fast; the methods that
move data or workers (retire, replicate, rebalance, restart) are in
``test_client_workers.py``. Waiting for something to happen polls with a deadline (no
timed assertions).
"""

from __future__ import annotations

import concurrent.futures as cf
import gzip
import logging
import os
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import msgpack
import pytest
import yaml

import trioscheduler
from polling import eventually
from trioscheduler import Client, LocalCluster, default_client, get_task_stream, get_worker

TIMEOUT = 60


def inc(x: int) -> int:
    return x + 1


def add(x: int, y: int) -> int:
    return x + y


def touch(i: int, path: str) -> int:
    Path(path, str(i)).touch()
    return i


def boom(x: Any) -> None:
    raise ZeroDivisionError(f"boom {x}")


def spin_until(path: str) -> str:
    """Busy (so the profiler sees it) until ``path`` exists."""
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(path) and time.monotonic() < deadline:
        sum(range(1000))
    return path



@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster: LocalCluster) -> Iterator[Client]:
    with Client(cluster) as c:
        c.wait_for_workers(2, timeout=TIMEOUT)
        yield c


# -- which client is current ---------------------------------------------------------------


def test_current_and_as_current(client: Client, cluster: LocalCluster) -> None:
    assert Client.current() is client
    assert default_client() is client
    other = Client(cluster, set_as_default=False)
    try:
        assert Client.current() is client  # not the default: not current
        with other.as_current():
            assert Client.current() is other
            assert default_client() is other
            seen: list[Any] = []
            t = threading.Thread(target=lambda: seen.append(Client.current()))
            t.start()
            t.join()
            assert seen == [client]  # as_current is for this thread only
        assert Client.current() is client
    finally:
        other.close()
    with pytest.raises(ValueError, match="No clients found"):
        Client.current(allow_global=False)


def test_loop_start_asynchronous_and_loop_keyword(client: Client, cluster: LocalCluster) -> None:
    assert client.asynchronous is False
    assert client.loop is not None
    client.start()  # running already: nothing happens, as dask's
    c = Client(cluster.scheduler_address, loop=object(), set_as_default=False)
    assert c.submit(inc, 1).result(timeout=TIMEOUT) == 2
    c.close()
    with pytest.raises(trioscheduler.TrioSchedulerError, match="closed"):
        c.start()
    with pytest.raises(TypeError, match="unexpected keyword"):
        client.start(bogus=1)


def test_repr_shows_workers_threads_memory(client: Client, cluster: LocalCluster) -> None:
    text = repr(client)
    assert cluster.scheduler_address in text and "processes=2" in text and "threads=4" in text
    assert "memory=" in text
    assert "workers=2" in repr(cluster) and "threads=4" in repr(cluster)
    html = client._repr_html_()
    assert "<table>" in html and "Workers" in html and cluster.scheduler_address in html
    assert "Threads" in cluster._repr_html_()
    link = client.dashboard_link  # the dashboard (issue 15): in both reprs
    assert link is not None and link == cluster.dashboard_link
    assert link in text and link in html


def test_write_scheduler_file(client: Client, tmp_path: Path) -> None:
    path = tmp_path / "scheduler.json"
    client.write_scheduler_file(str(path))
    c = Client(scheduler_file=str(path), set_as_default=False)
    assert c.scheduler_address == client.scheduler_address
    assert c.submit(inc, 41).result(timeout=TIMEOUT) == 42
    c.close()
    with pytest.raises(ValueError, match="already"):
        client.write_scheduler_file(str(tmp_path / "again.json"))
    client.scheduler_file = None


# -- futures -------------------------------------------------------------------------------


def test_get_executor_with_concurrent_futures(client: Client, tmp_path: Path) -> None:
    ex = client.get_executor(pure=False)
    fs = [ex.submit(inc, i) for i in range(5)]
    done, not_done = cf.wait(fs, timeout=TIMEOUT)
    assert len(done) == 5 and not not_done
    assert sorted(f.result() for f in cf.as_completed(fs, timeout=TIMEOUT)) == [1, 2, 3, 4, 5]
    assert list(ex.map(add, [1, 2, 3], [10, 20, 30], timeout=TIMEOUT)) == [11, 22, 33]
    bad = ex.submit(boom, 1)
    with pytest.raises(ZeroDivisionError, match="boom 1"):
        bad.result(timeout=TIMEOUT)
    gate = tmp_path / "gate"
    blocked = ex.submit(spin_until, str(gate))
    ex.shutdown(cancel_futures=True)
    with pytest.raises(cf.CancelledError):
        blocked.result(timeout=TIMEOUT)
    gate.touch()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(inc, 1)
    with pytest.raises(TypeError, match="unsupported arguments"):
        client.get_executor(bogus=True)
    with client.get_executor() as ex2:
        f = ex2.submit(inc, 100)
    assert f.result() == 101  # leaving ``with`` waited for it


def test_future_executor_bind_client_substitute(client: Client, cluster: LocalCluster) -> None:
    f = client.submit(inc, 1)
    assert f.executor is client
    assert f.result(timeout=TIMEOUT) == 2
    other = Client(cluster, set_as_default=False)
    try:
        f.bind_client(other)
        assert f.client is other and f.result(timeout=TIMEOUT) == 2
        assert f.key in other.futures
    finally:
        f.release()
        other.close()
    from dask._task_spec import TaskRef

    assert f.substitute({}) is f
    ref = f.substitute({f.key: "renamed"})
    assert isinstance(ref, TaskRef) and ref.key == "renamed"


def test_futures_of_and_normalize_collection(client: Client) -> None:
    x = dask.delayed(inc)(1)
    y = dask.delayed(add)(x, 10)
    persisted = client.persist(x)
    assert [f.key for f in client.futures_of(persisted)] == [x.key]
    assert client.futures_of([persisted, 3]) == client.futures_of(persisted)
    normal = client.normalize_collection(y)
    assert normal is not y
    assert any(isinstance(v, trioscheduler.Future) for v in trioscheduler.futures_of(normal))
    assert normal.compute() == 12
    fresh = dask.delayed(inc)(1000)
    assert client.normalize_collection(fresh) is fresh  # nothing held: the same object


def test_map_stops_at_the_shortest_iterable(client: Client) -> None:
    fs = client.map(add, [1, 2, 3], [10, 20])
    assert len(fs) == 2 and client.gather(fs) == [11, 22]


def test_map_sends_batches_while_it_reads_its_input(client: Client, tmp_path: Path) -> None:
    """A map goes out ``batch_size`` calls at a time: the cluster runs the first batches
    while the rest of a generator is still unread (here it waits for them to run)."""

    def calls() -> Iterator[int]:
        for i in range(10):
            if i == 6:
                eventually(lambda: (tmp_path / "3").exists(), "the first batches to run")
            yield i

    fs = client.map(touch, calls(), path=str(tmp_path), batch_size=2)
    assert client.gather(fs) == list(range(10))
    # batching changes no key: a pure call's is its token, an impure one's its position
    again = client.map(touch, range(10), path=str(tmp_path), batch_size=3)
    assert [f.key for f in again] == [f.key for f in fs]
    impure = client.map(touch, range(7), path=str(tmp_path), pure=False, batch_size=3)
    assert len({f.key for f in impure}) == 7 and client.gather(impure) == list(range(7))
    named = client.map(touch, range(5), path=str(tmp_path), key=list("abcde"), batch_size=2)
    assert [f.key for f in named] == list("abcde") and client.gather(named) == list(range(5))
    with pytest.raises(TypeError, match="batch_size"):
        client.map(touch, range(3), path=str(tmp_path), batch_size=0)
    with pytest.raises(ValueError, match="2 keys for 3 tasks"):
        client.map(touch, range(3), path=str(tmp_path), key=["a", "b"], batch_size=2)


def test_remote_traceback_is_a_real_traceback(client: Client) -> None:
    f = client.submit(boom, 7)
    with pytest.raises(ZeroDivisionError) as info:
        f.result(timeout=TIMEOUT)
    names = [fr.name for fr in traceback.extract_tb(info.value.__traceback__)]
    assert "boom" in names  # the worker's frame, for print_tb / pdb.post_mortem
    assert "boom" in [fr.name for fr in traceback.extract_tb(f.traceback())]


# -- diagnostics ---------------------------------------------------------------------------


def test_processing_call_stack_and_profile(client: Client, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    f = client.submit(spin_until, str(gate), pure=False)
    where = eventually(
        lambda: [w for w, keys in client.processing().items() if f.key in keys], "processing"
    )
    stacks = eventually(lambda: client.call_stack(f), "a call stack")
    assert list(stacks) == where
    assert any("spin_until" in line for line in stacks[where[0]][f.key])
    assert client.call_stack(keys=["no-such-key"]) == {}
    profile = eventually(
        lambda: (p := client.profile(key=f.key, workers=where)) and p["count"] and p,
        "profile samples",
    )

    def names(tree: dict[str, Any]) -> set[str]:
        out = {tree["description"]["name"]}
        for child in tree["children"].values():
            out |= names(child)
        return out

    assert "spin_until" in names(profile)
    per_worker = client.profile(merge_workers=False)
    assert set(per_worker) == set(client.scheduler_info()["workers"])
    gate.touch()
    assert f.result(timeout=TIMEOUT) == str(gate)
    with pytest.raises(ValueError, match="dashboard"):
        client.profile(plot=True)
    with pytest.raises(ValueError, match="task threads"):
        client.profile(scheduler=True)
    with pytest.raises(ValueError, match="unknown workers"):
        client.processing(workers=["tcp://127.0.0.1:1"])


def test_nbytes_story_and_task_stream(client: Client) -> None:
    start = time.time()
    fs = client.map(inc, range(3), key="nbytes-inc")
    client.gather(fs)
    per_key = client.nbytes(fs, summary=False)
    assert set(per_key) == {f.key for f in fs} and all(n > 0 for n in per_key.values())
    assert client.nbytes(fs) == {"nbytes-inc": sum(per_key.values())}  # per key prefix
    story = client.story(fs[0])
    assert [(e[1], e[2]) for e in story][-1][1] == "memory"
    assert all(e[0] == fs[0].key for e in story)
    assert all(abs(e[4] - time.time()) < 3600 for e in story)  # epoch times, as dask's
    by_stimulus = client.story(story[-1][3])
    assert story[-1][:4] in [e[:4] for e in by_stimulus]
    stream = client.get_task_stream(start=start)
    mine = [r for r in stream if r["key"] in per_key]
    assert len(mine) == 3
    for r in mine:
        assert r["status"] == "OK" and r["worker"] in client.scheduler_info()["workers"]
        [ss] = r["startstops"]
        assert ss["action"] == "compute" and ss["start"] <= ss["stop"]
    with get_task_stream() as ts:
        client.submit(inc, 123456).result(timeout=TIMEOUT)
    assert [r["key"] for r in ts.data] == [client.submit(inc, 123456).key]
    assert len(client.get_task_stream(count=1)) == 1
    with pytest.raises(ValueError, match="dashboard"):
        client.get_task_stream(plot=True)


def log_warning_here(text: str) -> str:
    logging.getLogger("trioscheduler.usertest").warning(text)
    return text


def test_scheduler_and_worker_logs(client: Client) -> None:
    client.run_on_scheduler(log_warning_here, "scheduler says hi")
    logs = client.get_scheduler_logs()
    assert logs and logs[0][0] == "WARNING" and "scheduler says hi" in logs[0][1]
    assert len(client.get_scheduler_logs(n=1)) == 1
    client.run(log_warning_here, "worker says hi")
    per_worker = client.get_worker_logs(n=5)
    assert set(per_worker) == set(client.scheduler_info()["workers"])
    for lines in per_worker.values():
        assert any("worker says hi" in line for _, line in lines)
    with pytest.raises(ValueError, match="non-negative"):
        client.get_worker_logs(n=-1)
    with pytest.raises(ValueError, match="nanny"):
        client.get_worker_logs(nanny=True)


def test_versions_metadata_dump_benchmark(client: Client, tmp_path: Path) -> None:
    v = client.get_versions(check=True, packages=["numpy", "no-such-package-here"])
    assert set(v) == {"scheduler", "workers", "client"}
    assert set(v["workers"]) == set(client.scheduler_info()["workers"])
    assert v["client"]["packages"]["trioscheduler"] == trioscheduler.__version__
    assert v["scheduler"]["packages"]["no-such-package-here"] is None
    with pytest.raises(TypeError, match="list of package names"):
        client.get_versions(packages="numpy")

    client.set_metadata("flat", 1)
    client.set_metadata(["a", "b", "c"], {"x": [1, 2]})
    assert client.get_metadata("flat") == 1
    assert client.get_metadata(["a", "b"]) == {"c": {"x": [1, 2]}}
    assert client.get_metadata(["a", "nope"], default="d") == "d"
    with pytest.raises(KeyError, match="nope"):
        client.get_metadata(["a", "nope", "deeper"])

    fs = client.map(inc, range(2), key="dumped")
    client.gather(fs)
    path = client.dump_cluster_state(str(tmp_path / "dump"))
    with gzip.open(path) as f:
        state = msgpack.unpackb(f.read())
    assert {"scheduler", "workers", "versions"} <= set(state)
    assert str(fs[0].key) in state["scheduler"]["tasks"]
    ypath = client.dump_cluster_state(str(tmp_path / "dump"), format="yaml")
    with open(ypath) as f:
        assert str(fs[1].key) in yaml.safe_load(f)["scheduler"]["tasks"]
    with pytest.raises(ValueError, match="format"):
        client.dump_cluster_state(format="json")

    bench = client.benchmark_hardware()
    assert set(bench) == {"memory", "disk", "network"}
    assert all(rate > 0 for kind in bench.values() for rate in kind.values())


def test_scheduler_info_has_worker_metrics(client: Client) -> None:
    info = eventually(
        lambda: (
            all(w["metrics"] for w in client.scheduler_info()["workers"].values())
            and client.scheduler_info()
        ),
        "heartbeat metrics",
    )
    for w in info["workers"].values():
        assert w["metrics"]["memory"] > 0 and "executing" in w


# -- events, topics, logging ------------------------------------------------------------------


def log_from_task(topic: str, msg: Any) -> None:
    get_worker().log_event(topic, msg)


def test_events_and_topics(client: Client) -> None:
    client.log_event("compat-topic", {"n": 1})
    client.log_event(["compat-a", "compat-b"], "both")
    events = client.get_events("compat-topic")
    assert len(events) == 1 and events[0][1] == {"n": 1} and events[0][0] <= time.time()
    assert client.get_events("compat-b")[0][1] == "both"
    assert "compat-a" in client.get_events()

    got: list[Any] = []
    arrived = threading.Event()

    def handler(event: Any) -> None:
        got.append(event)
        arrived.set()

    client.subscribe_topic("compat-live", handler)
    client.submit(log_from_task, "compat-live", "from a task", pure=False).result(timeout=TIMEOUT)
    assert arrived.wait(TIMEOUT)
    assert got[0][1] == "from a task"
    client.unsubscribe_topic("compat-live")
    with pytest.raises(ValueError, match="no event handler"):
        client.unsubscribe_topic("compat-live")
    with pytest.raises(TypeError, match="topic"):
        client.log_event(3, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        client.subscribe_topic("t", "not callable")  # type: ignore[arg-type]


def log_in_task(name: str, text: str) -> None:
    logging.getLogger(name).warning(text)


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_forward_logging_from_tasks(client: Client) -> None:
    keep = _Keep()
    log = logging.getLogger("compat.tasks")
    log.addHandler(keep)
    try:
        client.forward_logging("compat.tasks", level=logging.WARNING)
        client.submit(log_in_task, "compat.tasks", "hello from a task", pure=False).result(
            timeout=TIMEOUT
        )
        eventually(lambda: keep.records, "a forwarded record")
        record = keep.records[0]
        assert record.getMessage() == "hello from a task" and record.levelname == "WARNING"
        client.unforward_logging("compat.tasks")
        client.submit(log_in_task, "compat.tasks", "not forwarded", pure=False).result(
            timeout=TIMEOUT
        )
        client.log_event("compat-sync", 1)  # a round trip behind any late event
        assert [r.getMessage() for r in keep.records] == ["hello from a task"]
    finally:
        log.removeHandler(keep)


def print_in_task(text: str) -> None:
    trioscheduler.print(text)
    trioscheduler.warn(f"warned {text}", RuntimeWarning)


def test_print_and_warn_in_tasks_reach_the_client(
    client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client.submit(print_in_task, "compat-print", pure=False).result(timeout=TIMEOUT)
        out: list[str] = []
        eventually(
            lambda: out.append(capsys.readouterr().out) or "compat-print" in "".join(out),
            "the printed text",
        )
        warned = eventually(
            lambda: [w for w in caught if "warned compat-print" in str(w.message)],
            "the warning",
        )
    assert warned[0].category is RuntimeWarning


async def test_the_new_methods_are_awaitable_on_an_asynchronous_client() -> None:
    import trio

    from trioscheduler import open_cluster

    with trio.fail_after(TIMEOUT):
        async with (
            open_cluster(2, 1, processes=False) as cluster,
            Client(cluster, asynchronous=True) as c,
        ):
            assert c.loop is None and c.asynchronous
            fs = c.map(inc, range(4))
            assert await c.gather(fs) == [1, 2, 3, 4]
            await c.replicate(fs[:1])
            assert [len(w) for w in (await c.who_has(fs[:1])).values()] == [2]
            assert await c.amm.run_once() == 1
            got: list[Any] = []
            arrived = trio.Event()

            async def handler(event: Any) -> None:
                got.append(event[1])
                arrived.set()

            await c.subscribe_topic("async-topic", handler)
            await c.log_event("async-topic", "hi")
            await arrived.wait()
            assert got == ["hi"]
            assert (await c.get_events("async-topic"))[0][1] == "hi"
            await c.set_metadata(["k"], 1)
            assert await c.get_metadata("k") == 1
            assert set(await c.processing()) == set(cluster.worker_addresses)
            assert (await c.nbytes(fs, summary=False)).keys() == {f.key for f in fs}
            assert set(await c.get_versions()) == {"scheduler", "workers", "client"}
            await c.shutdown()
            assert c.status == "closed"
