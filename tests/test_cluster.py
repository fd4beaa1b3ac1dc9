"""LocalCluster and open_cluster: real worker processes, resilience, no leftover children."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any

import cloudpickle
import psutil
import pytest
import trio

from polling import wait_until
from trioscheduler import wire
from trioscheduler.client.client import Client
from trioscheduler.core.errors import KilledWorker
from trioscheduler.deploy.cluster import LocalCluster, default_sizes, open_cluster
from trioscheduler.server.nanny import Nanny, fork_supported
from trioscheduler.wire.runspec import RunSpecLoadError

TIMEOUT = 60

needs_fork = pytest.mark.skipif(not fork_supported(), reason="fork needs Linux pidfd")
BOTH = pytest.mark.parametrize("method", [pytest.param("fork", marks=needs_fork), "spawn"])


def worker_children() -> list[psutil.Process]:
    """Our worker processes still alive (children of this test process).

    A spawned worker says ``trioscheduler`` on its command line; a forked one has ours
    but renames itself (``/proc/self/comm``).
    """
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            named = p.name() == "trioscheduler" or "trioscheduler" in " ".join(p.cmdline())
            if named and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out



def inc(x: int) -> int:
    return x + 1


def slow_inc(x: int) -> int:
    time.sleep(0.05)
    return x + 1


def add(a: int, b: int) -> int:
    return a + b


def test_keyword_the_workers_do_not_take_fails_before_anything_starts() -> None:
    """No scheduler or thread is started for a keyword that could never work."""
    threads = {t.name for t in __import__("threading").enumerate()}
    with pytest.raises(ValueError, match=r"python=.*processes=True"):
        LocalCluster(1, processes=False, python=sys.executable)
    with pytest.raises(TypeError, match=r"'nthread'.*Nanny \(processes=True\)"):
        LocalCluster(1, nthread=2)
    with pytest.raises(TypeError, match=r"'preload_nanny'.*Worker \(processes=False\)"):
        LocalCluster(1, processes=False, preload_nanny=["x"])
    assert {t.name for t in __import__("threading").enumerate()} <= threads


def test_default_sizes() -> None:
    assert default_sizes(None, None, True, cores=2) == (2, 1)
    assert default_sizes(None, None, True, cores=16) == (4, 4)
    assert default_sizes(None, None, True, cores=12) == (4, 3)
    assert default_sizes(None, None, False, cores=8) == (1, 8)
    assert default_sizes(3, None, True, cores=8) == (3, 2)
    assert default_sizes(None, 2, True, cores=8) == (4, 2)
    assert default_sizes(5, 3, True, cores=2) == (5, 3)


async def test_open_cluster_in_process_and_scale() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_cluster(2, 1, processes=False) as cluster:
            assert cluster.scheduler_address.startswith("inproc://")
            assert len(cluster.workers) == 2
            assert all(a.startswith("inproc://") for a in cluster.worker_addresses)
            async with Client(cluster, asynchronous=True) as c:
                assert await c.submit(sum, c.map(inc, range(10))) == 55
                await cluster.scale(3)
                assert len(cluster.workers) == 3
                await wait_until(lambda: len(cluster.scheduler.state.workers) == 3)  # type: ignore[union-attr]
                await cluster.scale(1)
                assert len(cluster.workers) == 1
                await wait_until(lambda: len(cluster.scheduler.state.workers) == 1)  # type: ignore[union-attr]
                assert await c.submit(inc, 41) == 42
        assert cluster.status == "closed" and not cluster.workers


@BOTH
def test_sync_cluster_with_processes_leaves_no_child(method: str) -> None:
    before = {p.pid for p in worker_children()}
    limit = 500 * 2**20  # with fork, plus our RSS, which the children start with
    limit += psutil.Process().memory_info().rss if method == "fork" else 0
    with LocalCluster(2, 1, memory_limit=limit, start_method=method) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        assert len(cluster.workers) == 2 and all(
            isinstance(n, Nanny) for n in cluster.workers.values()
        )
        assert len({p.pid for p in worker_children()} - before) == 2
        with Client(cluster) as client:
            futures = client.map(slow_inc, range(20))
            assert client.submit(sum, futures).result(timeout=TIMEOUT) == sum(range(1, 21))
            cluster.scale(3)
            assert len(cluster.workers) == 3 and len(cluster.worker_addresses) == 3
            client.wait_for_workers(3, timeout=TIMEOUT)
            assert {n.started_by for n in cluster.workers.values()} == {method}  # type: ignore[union-attr]
            cluster.scale(1)
            assert list(cluster.workers) == ["0"]
            assert client.submit(inc, 1, pure=False).result(timeout=TIMEOUT) == 2
    assert {p.pid for p in worker_children()} <= before
    assert cluster.status == "closed"


def test_failing_halfway_leaves_no_child() -> None:
    before = {p.pid for p in worker_children()}
    with pytest.raises(RuntimeError, match="halfway"):
        with LocalCluster(2, 1, processes=True, memory_limit=0):
            assert len({p.pid for p in worker_children()} - before) == 2
            raise RuntimeError("the test failed halfway")
    assert {p.pid for p in worker_children()} <= before


async def test_nanny_failing_halfway_in_trio_leaves_no_child() -> None:
    before = {p.pid for p in worker_children()}
    with trio.fail_after(TIMEOUT), pytest.raises(RuntimeError, match="halfway"):
        async with open_cluster(1, 1, processes=True, memory_limit=0) as cluster:
            assert len(cluster.workers) == 1
            raise RuntimeError("halfway")
    assert {p.pid for p in worker_children()} <= before


async def test_missing_module_on_worker(tmp_path: Any) -> None:
    """A function from a module the workers cannot import errs with that reason."""
    (tmp_path / "only_here_mod.py").write_text("def triple(x):\n    return 3 * x\n")
    with trio.fail_after(TIMEOUT):
        async with open_cluster(1, 1, processes=True, memory_limit=0) as cluster:
            # the module becomes importable here only after the workers started
            sys.path.insert(0, str(tmp_path))
            try:
                import only_here_mod  # type: ignore[import-not-found]

                async with Client(cluster, asynchronous=True) as c:
                    with pytest.raises(RunSpecLoadError, match="No module named 'only_here_mod'"):
                        await c.submit(only_here_mod.triple, 2)
                    assert await c.submit(inc, 1) == 2  # the worker is fine
            finally:
                sys.path.remove(str(tmp_path))
                sys.modules.pop("only_here_mod", None)


@BOTH
async def test_kill_9_mid_graph_recovers(caplog: pytest.LogCaptureFixture, method: str) -> None:
    caplog.set_level(logging.WARNING, logger="trioscheduler")
    with trio.fail_after(TIMEOUT):
        async with open_cluster(2, 1, memory_limit=0, start_method=method) as cluster:
            async with Client(cluster, asynchronous=True) as c:
                first = c.map(slow_inc, range(40))
                pairs = [c.submit(add, first[i], first[i + 1]) for i in range(0, 40, 2)]
                total = c.submit(sum, pairs)
                # kill one worker once some first-stage results live on it
                await wait_until(lambda: sum(f.done() for f in first) >= 8)
                assert not total.done()
                victim = cluster.workers["0"]
                assert isinstance(victim, Nanny) and victim.pid is not None
                old_pid, old_address = victim.pid, victim.worker_address
                os.kill(old_pid, signal.SIGKILL)
                assert await total == sum(range(1, 41)) * 1  # sum of (x+1) over 0..39
                # the nanny brought a new worker back
                await wait_until(lambda: victim.restarts == 1 and victim.pid != old_pid)
                await wait_until(lambda: len(cluster.scheduler.state.workers) == 2)  # type: ignore[union-attr]
                assert old_address not in cluster.scheduler.state.workers  # type: ignore[union-attr]
                assert victim.started_by == method
                assert await c.submit(inc, 1, workers=[victim.worker_address], pure=False) == 2
    text = caplog.text
    assert old_address in text and "lost" in text  # the scheduler said why
    assert "SIGKILL" in text  # the nanny said why


def exit_worker(x: int) -> int:
    os._exit(1)


async def test_task_killing_its_worker_three_times_is_killedworker() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_cluster(2, 1, processes=True, memory_limit=0) as cluster:
            async with Client(cluster, asynchronous=True) as c:
                # Finished work survives (lost results are recomputed). Tasks *processing*
                # on a dying worker are suspects too, as in dask, so none run meanwhile.
                good = c.map(slow_inc, range(10))
                assert [await f for f in good] == list(range(1, 11))
                bad = c.submit(exit_worker, 1, key="suicidal")
                with pytest.raises(KilledWorker) as info:
                    await bad
                assert info.value.key == "suicidal"
                assert "suicidal" in str(info.value)
                assert len(info.value.workers) == 3
                assert all(w.startswith("tcp://") for w in info.value.workers)
                assert [await f for f in good] == list(range(1, 11))
                assert await c.submit(inc, 1, key="after") == 2
                restarts = sum(n.restarts for n in cluster.workers.values())  # type: ignore[union-attr]
                assert restarts >= 3


def make_block(i: int) -> Any:
    import numpy as np

    return np.full(50 * 2**20 // 8, float(i))


def spilled_count(dask_worker: Any) -> int:
    return len(dask_worker.store.spilled)


def block_sum(x: Any) -> float:
    return float(x.sum())


async def test_twice_its_memory_limit_through_one_worker_by_spilling(tmp_path: Any) -> None:
    """500 MB of results through a 300 MiB worker process: spilled, never killed."""
    with trio.fail_after(TIMEOUT):
        async with open_cluster(
            1, 1, processes=True, memory_limit="300MiB", local_directory=str(tmp_path)
        ) as cluster:
            async with Client(cluster, asynchronous=True) as c:
                blocks = c.map(make_block, range(10))
                sums = c.map(block_sum, blocks)
                assert [await f for f in sums] == [float(i) * (50 * 2**20 // 8) for i in range(10)]
                last = await blocks[-1]  # comes back from disk intact
                assert last.shape == (50 * 2**20 // 8,) and (last == 9.0).all()
                (address,) = cluster.worker_addresses
                async with wire.ConnectionPool() as pool, pool.connect(address) as stream:
                    count = cloudpickle.dumps((spilled_count, (), {}))
                    await stream.send({"op": "run", "function": count})
                    assert (await stream.receive())["result"] >= 4
            nanny = cluster.workers["0"]
            assert isinstance(nanny, Nanny) and nanny.restarts == 0


FORKING_SCRIPT = """
import os, sys, time
from trioscheduler.client.client import Client
from trioscheduler.deploy.cluster import LocalCluster

def shout(address):
    print("from-task", address, flush=True)
    return os.getpid()

if __name__ == "__main__":
    sys.stdout.write("parent-before\\n")  # sits in our buffer (stdout is a file) at the fork
    with LocalCluster(2, 1, memory_limit=0, start_method="fork") as cluster:
        assert {n.started_by for n in cluster.workers.values()} == {"fork"}
        with Client(cluster) as client:
            pids = [
                client.submit(shout, a, workers=[a], pure=False).result()
                for a in cluster.worker_addresses
            ]
            print("pids", *pids, flush=True)
            if sys.argv[1] == "hang":
                time.sleep(600)
    print("parent-after")
"""


BUSY_SCRIPT = """
import logging, sys, threading
import numpy as np
from trioscheduler.client.client import Client
from trioscheduler.deploy.cluster import LocalCluster

logging.basicConfig(stream=sys.stderr, level=logging.INFO)
stop = threading.Event()

def busy():  # holds the logging, stderr and numpy locks as often as it can
    while not stop.is_set():
        logging.getLogger("busy").info("x" * 200)
        print("y" * 100, file=sys.stderr)
        np.random.random(100)

threads = [threading.Thread(target=busy, daemon=True) for _ in range(2)]
for t in threads:
    t.start()
with LocalCluster(2, 1, memory_limit=0, start_method="fork") as cluster:
    with Client(cluster) as client:
        for i in range(5):
            client.restart()
            assert client.submit(abs, -i, pure=False).result(timeout=60) == i
        methods = {n.started_by for n in cluster.workers.values()}
stop.set()
for t in threads:
    t.join()
print("done", sorted(methods), flush=True)
"""


async def _run_script(path: Any, text: str, *args: str) -> Any:
    """Write ``text`` to ``path`` and run it in a fresh interpreter; the finished process."""
    path.write_text(text)
    with trio.fail_after(TIMEOUT):
        return await trio.run_process(
            [sys.executable, str(path), *args], capture_stdout=True, capture_stderr=True,
            check=False,
        )


@needs_fork
async def test_forks_while_other_threads_log_print_and_draw(tmp_path: Any) -> None:
    """Locks other threads hold at the fork (logging, stderr, numpy) do not hang a child."""
    done = await _run_script(tmp_path / "busy.py", BUSY_SCRIPT)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert done.stdout.decode().strip() == "done ['fork']"
    assert "Traceback" not in done.stderr.decode()


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@needs_fork
async def test_forked_workers_print_once_and_leave_nothing(tmp_path: Any) -> None:
    """What the parent wrote before the fork is not written again by the children."""
    done = await _run_script(tmp_path / "forking.py", FORKING_SCRIPT, "exit")
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    out = done.stdout.decode()
    assert out.count("parent-before") == 1, out
    assert out.count("from-task") == 2 and out.count("parent-after") == 1, out
    pids = [int(p) for p in out.split("pids", 1)[1].split("\n", 1)[0].split()]
    assert len(set(pids)) == 2
    assert all(_gone(pid) for pid in pids)
    assert "Traceback" not in done.stderr.decode(), done.stderr.decode()


@needs_fork
async def test_forked_workers_exit_when_their_parent_is_killed(tmp_path: Any) -> None:
    script, out, err = tmp_path / "forking.py", tmp_path / "out.txt", tmp_path / "err.txt"
    script.write_text(FORKING_SCRIPT)
    with out.open("wb") as fo, err.open("wb") as fe:  # noqa: ASYNC230 - empty files
        proc = await trio.lowlevel.open_process(
            [sys.executable, str(script), "hang"], stdout=fo, stderr=fe
        )
    try:
        with trio.move_on_after(TIMEOUT) as started:
            while "pids" not in out.read_text():  # noqa: ASYNC110 - another process writes it
                await trio.sleep(0.05)
        assert not started.cancelled_caught, (out.read_text(), err.read_text())
        pids = [int(p) for p in out.read_text().split("pids", 1)[1].split()]
        assert not any(_gone(pid) for pid in pids)
        proc.send_signal(signal.SIGKILL)  # no clean-up at all: the workers see stdin EOF
        await proc.wait()
        with trio.move_on_after(TIMEOUT) as ended:
            await wait_until(lambda: all(_gone(pid) for pid in pids))
        assert not ended.cancelled_caught, [(p, _gone(p)) for p in pids]
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


def draw(_: int) -> tuple[int, float]:
    import numpy as np

    return os.getpid(), float(np.random.random())


@needs_fork
async def test_forked_workers_draw_different_random_numbers() -> None:
    """numpy's global state is reseeded in each child (``random`` reseeds itself)."""
    import numpy as np

    np.random.seed(1)  # imported here before the fork, so the children inherit this state
    with trio.fail_after(TIMEOUT):
        async with open_cluster(2, 1, memory_limit=0, start_method="fork") as cluster:
            async with Client(cluster, asynchronous=True) as c:
                draws = {
                    await c.submit(draw, 0, workers=[a], pure=False)
                    for a in cluster.worker_addresses
                }
    assert len({pid for pid, _ in draws}) == 2
    assert len({x for _, x in draws}) == 2
    np.random.seed(1)
    assert np.random.random() not in {x for _, x in draws}
