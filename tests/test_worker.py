"""The worker shell against a real Scheduler and Client, over inproc:// and tcp://."""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest
import trio

from trioscheduler import TrioSchedulerWarning, wire
from trioscheduler.client.client import Client
from trioscheduler.server.scheduler import Scheduler
from trioscheduler.server.task_context import get_task_key, get_worker, secede
from trioscheduler.server.worker import Worker

TIMEOUT = 30


@pytest.fixture(params=["inproc", "tcp"])
def scheduler_address(request: pytest.FixtureRequest) -> str:
    if request.param == "inproc":
        return f"inproc://test-worker-{os.getpid()}-{request.node.name}"
    return "tcp://127.0.0.1:0"


async def wait_until(predicate: Any) -> None:
    """Poll a condition of the running system (the caller's fail_after bounds it)."""
    while not predicate():  # noqa: ASYNC110 - another component's state, no event to wait on
        await trio.sleep(0.01)


@asynccontextmanager
async def cluster(
    address: str, n: int = 2, **worker_kwargs: Any
) -> AsyncIterator[tuple[Scheduler, list[Worker], Client]]:
    worker_kwargs.setdefault("memory_limit", 0)
    async with Scheduler(address) as s:
        workers = [Worker(s.address, **worker_kwargs) for _ in range(n)]
        async with workers[0], workers[1] if n > 1 else _nothing():
            async with Client(s.address, asynchronous=True) as c:
                await wait_until(lambda: len(s.state.workers) == n)
                yield s, workers, c


@asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield None


def inc(x: int) -> int:
    return x + 1


def whoami(_: Any = None) -> str:
    return get_worker().address


async def test_join_serve_and_leave(scheduler_address: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with Scheduler(scheduler_address) as s:
            async with Worker(s.address, nthreads=2, name="alice", memory_limit="1GiB") as w:
                scheme = wire.parse_address(s.address)[0]
                assert w.address.startswith(f"{scheme}://")
                assert w.status == "running"
                await wait_until(lambda: w.address in s.state.workers)
                assert w.memory_limit == 2**30
                # dask's default: at most 10% of the memory limit fetched from peers at once
                assert w.state.transfer_incoming_bytes_limit == 2**30 // 10
                # the data server, as a peer would use it
                async with wire.ConnectionPool() as pool, pool.connect(w.address) as stream:
                    await stream.send({"op": "update_data", "data": {"x": b"abc", ("y", 1): 7}})
                    reply = await stream.receive()
                    assert reply["status"] == "OK" and set(reply["nbytes"]) == {"x", ("y", 1)}
                    await stream.send({"op": "get_data", "keys": ["x", ("y", 1), "nope"]})
                    reply = await stream.receive()
                    assert reply == {
                        "status": "OK",
                        "data": {"x": b"abc", ("y", 1): 7},
                        "missing": ["nope"],
                        "seq": 1,  # data updates taken before it looked (one scatter)
                    }
                    await stream.send({"op": "frobnicate"})
                    reply = await stream.receive()
                    assert reply["status"] == "error" and "unknown op" in reply["text"]
            assert w.status == "closed"
            # the orderly goodbye removed the worker from the scheduler
            await wait_until(lambda: not s.state.workers)
            assert not os.path.exists(w.store.directory)  # type: ignore[union-attr]  # noqa: ASYNC240


async def test_graph_across_workers(scheduler_address: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster(scheduler_address, nthreads=2) as (s, workers, c):
            xs = c.map(inc, range(50))
            total = c.submit(sum, xs)
            assert await total == sum(range(1, 51))
            # dependencies were fetched from peers: each worker computed some
            holders = {await f for f in c.map(whoami, range(20), pure=False)}
            assert holders <= {w.address for w in workers}
            # big values travel between workers intact
            arrays = [c.submit(np.arange, 200_000, dtype="f8", pure=False) for _ in range(4)]
            stacked = c.submit(np.concatenate, arrays)
            result = await stacked
            assert result.shape == (800_000,) and result[-1] == 199_999.0


async def test_errors_async_tasks_and_task_context(scheduler_address: str) -> None:
    def boom(x: int) -> None:
        raise ZeroDivisionError(f"no {x}")

    async def async_task(x: int) -> tuple[int, str, Any]:
        await trio.sleep(0.01)
        return x * 2, get_worker().address, get_task_key()

    def seceding(x: int) -> tuple[int, Any]:
        secede()  # frees the slot; the task still completes
        return x, get_task_key()

    with trio.fail_after(TIMEOUT):
        async with cluster(scheduler_address, nthreads=1) as (_s, workers, c):
            with pytest.raises(ZeroDivisionError, match="no 3"):
                await c.submit(boom, 3)
            value, addr, key = await c.submit(async_task, 21, key="async-1")
            assert value == 42 and addr in {w.address for w in workers} and key == "async-1"
            # one thread per worker, yet four seceding tasks all finish
            results = [await f for f in c.map(seceding, range(4), key=[f"s-{i}" for i in range(4)])]
            assert results == [(i, f"s-{i}") for i in range(4)]
            assert await c.submit(inc, 1) == 2  # the worker still works after secede
            with pytest.raises(ValueError, match="outside of a task"):
                get_worker()


async def test_run_function_on_worker(scheduler_address: str) -> None:
    import cloudpickle

    def describe(x: int, dask_worker: Worker) -> tuple[int, str]:
        return x, dask_worker.address

    def fails() -> None:
        raise KeyError("inside run")

    with trio.fail_after(TIMEOUT):
        async with cluster(scheduler_address, n=1) as (_s, workers, _c):
            w = workers[0]
            async with wire.ConnectionPool() as pool, pool.connect(w.address) as stream:
                await stream.send(
                    {"op": "run", "function": cloudpickle.dumps((describe, (5,), {}))}
                )
                assert await stream.receive() == {"status": "OK", "result": (5, w.address)}
                await stream.send({"op": "run", "function": cloudpickle.dumps((fails, (), {}))})
                reply = await stream.receive()
                assert reply["status"] == "error" and "inside run" in reply["text"]
                assert isinstance(reply["exception"], bytes)


def make_array(i: int, n: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(n)


async def test_spill_to_disk_and_back(tmp_path: Any) -> None:
    """Managed data above the target fraction goes to real spill files and comes back equal."""
    n = 1_000_000  # 8 MB per array; 10 arrays against a 40 MB limit (target: 24 MB)
    with trio.fail_after(TIMEOUT):
        async with Scheduler("inproc://spill-test") as s:
            async with Worker(
                s.address,
                nthreads=1,
                memory_limit=40_000_000,
                memory_spill_fraction=None,  # the test process itself is far above 40 MB
                memory_pause_fraction=None,
                local_directory=str(tmp_path),
            ) as w:
                async with Client(s.address, asynchronous=True) as c:
                    futures = [c.submit(make_array, i, n) for i in range(10)]
                    for f in futures:
                        await f
                    store = w.store
                    assert store is not None
                    await wait_until(lambda: len(store.spilled) >= 5 and not store.writing)
                    # every finished write was reported: the core's books match the disk
                    ws = w.state
                    assert ws is not None
                    assert ws.writing == {} and ws.writing_bytes == 0
                    assert ws.spilled == set(store.spilled)
                    files = os.listdir(store.directory)
                    assert len(files) == len(store.spilled)
                    assert store.directory.startswith(str(tmp_path))
                    values = [await f for f in futures]
                    for i, v in enumerate(values):
                        assert v.tobytes() == make_array(i, n).tobytes()
                    # a task reading spilled inputs gets them back intact too
                    total = await c.submit(lambda *xs: float(sum(x.sum() for x in xs)), *futures)
                    assert total == pytest.approx(sum(make_array(i, n).sum() for i in range(10)))


def make_lock(_: int) -> Any:
    return threading.Lock()


async def test_unpicklable_results_stay_in_memory_with_one_warning() -> None:
    with (
        trio.fail_after(TIMEOUT),
        pytest.warns(TrioSchedulerWarning, match="cannot be pickled") as rec,
    ):
        async with Scheduler("inproc://unpicklable-test") as s:
            async with Worker(
                s.address,
                nthreads=1,
                memory_limit=1,  # a fraction: all of memory; then squeeze the target
                memory_target_fraction=1e-12,
                memory_spill_fraction=None,
                memory_pause_fraction=None,
            ) as w:
                async with Client(s.address, asynchronous=True) as c:
                    locks = c.map(make_lock, range(3))
                    for f in locks:
                        await f
                    ok = c.submit(np.arange, 1000)
                    assert (await ok).sum() == 499500
                    store = w.store
                    assert store is not None
                    await wait_until(lambda: ok.key in store.spilled)
                    assert all(f.key in store.memory for f in locks)
                    ws = w.state  # SpillFailed ended the writes of the locks in the core too
                    assert ws is not None
                    await wait_until(lambda: not ws.writing)
                    assert all(f.key in ws.in_memory for f in locks)
    assert len([r for r in rec if issubclass(r.category, TrioSchedulerWarning)]) == 1


async def test_unreachable_scheduler_is_a_plain_error() -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(wire.ConnectError, match="127.0.0.1:1"):
        async with Worker("tcp://127.0.0.1:1", connect_timeout=0.5, memory_limit=0):
            raise AssertionError("should not start")
    with pytest.raises(ValueError, match="nthreads"):
        Worker("tcp://127.0.0.1:1", nthreads=0)


async def test_memory_pause_reaches_the_scheduler() -> None:
    """A worker above its pause threshold (process RSS) stops getting tasks; others carry on."""
    with trio.fail_after(TIMEOUT):
        async with Scheduler("inproc://pause-test") as s:
            # This test process uses far more than 20 MB: the first worker pauses at once.
            tiny = Worker(s.address, memory_limit=20_000_000, memory_spill_fraction=None)
            roomy = Worker(s.address, memory_limit=0)
            async with tiny, roomy, Client(s.address, asynchronous=True) as c:
                await wait_until(lambda: s.state.workers.get(tiny.address) is not None)
                await wait_until(lambda: s.state.workers[tiny.address].status == "paused")
                where = {await f for f in c.map(whoami, range(20), pure=False)}
                assert where == {roomy.address}
                metrics = tiny.metrics()
                assert metrics["memory"] > 20_000_000 and metrics["status"] == "paused"


_attempts: list[str] = []


def reschedule_once() -> int:
    from trioscheduler.server.task_context import Reschedule

    _attempts.append(get_worker().address)
    if len(_attempts) == 1:
        raise Reschedule()
    return len(_attempts)


async def test_reschedule_hands_the_task_back() -> None:
    _attempts.clear()
    with trio.fail_after(TIMEOUT):
        async with cluster("inproc://reschedule-test") as (_s, _workers, c):
            assert await c.submit(reschedule_once, pure=False) == 2


async def test_retired_worker_hands_over_its_data_and_closes() -> None:
    """Retirement: AcquireReplicas on the heir, then CloseWorker; the worker shuts down."""
    from trioscheduler.core.messages import RetireWorker

    with trio.fail_after(TIMEOUT):
        async with cluster("inproc://retire-test") as (s, workers, c):
            leaving, staying = workers
            futures = c.map(inc, range(20), workers=[leaving.address])
            for f in futures:
                await f
            assert leaving.store is not None and leaving.store.memory  # it holds results
            # what a scheduler-side retire_workers() does (no client API for it yet)
            s._feed(RetireWorker("test-retire", trio.current_time(), leaving.address))
            await leaving.finished()
            assert "retired" in leaving.close_reason
            await wait_until(lambda: list(s.state.workers) == [staying.address])
            assert [await f for f in futures] == list(range(1, 21))
            assert staying.store is not None and len(staying.store) >= 20
