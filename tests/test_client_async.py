"""The asynchronous Client on both of anyio's backends: trio and asyncio.

Every test here runs twice (``anyio_backend``). The cluster (real worker processes) runs
in the background loop of a sync ``LocalCluster``, so that the code under test is only
the client's async side. Under trio the client's session runs in the test's own task
tree; under asyncio in the background trio loop, bridged (``client/bridge.py``).
"""

from __future__ import annotations

import time
import traceback
from typing import Any

import anyio
import dask.array as da
import pytest
import sniffio

from trioscheduler import (
    Client,
    LocalCluster,
    as_completed,
    get_task_metadata,
    wait,
)
from trioscheduler.client.base import ClientClosedError
from trioscheduler.plugins import WorkerPlugin

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def cluster() -> Any:
    with LocalCluster(2, 2, memory_limit=0) as cluster:
        yield cluster


def inc(x: int) -> int:
    return x + 1


def boom(x: int) -> int:
    raise ValueError(f"boom {x}")


def slow(x: float) -> float:
    time.sleep(x)
    return x


class Marker(WorkerPlugin):
    name = "async-marker"

    def setup(self, worker: Any) -> None:
        worker.async_marker = sniffio_name


sniffio_name = "set by the test"


def _marker(dask_worker: Any = None) -> Any:
    return getattr(dask_worker, "async_marker", None)


async def test_runs_on_the_backend_it_is_given(anyio_backend: str) -> None:
    assert sniffio.current_async_library() == anyio_backend


async def test_submit_map_gather_and_await(cluster: Any, anyio_backend: str) -> None:
    async with Client(cluster.scheduler_address, asynchronous=True) as c:
        f = c.submit(inc, 1)
        assert await f == 2
        assert await f.result() == 2
        fs = c.map(inc, range(10))
        assert await c.gather(fs) == list(range(1, 11))
        done, not_done = await wait(fs)
        assert len(done) == 10 and not not_done
        [s] = await c.scatter([41])
        assert await c.submit(inc, s) == 42
        assert sorted(await c.run(inc, 1)) == sorted(cluster.worker_addresses)
        assert await c.run_on_scheduler(inc, 2) == 3
        assert len(await c.nthreads()) == 2


async def test_errors_keep_their_type_and_traceback(cluster: Any, anyio_backend: str) -> None:
    async with Client(cluster.scheduler_address, asynchronous=True) as c:
        f = c.submit(boom, 7)
        with pytest.raises(ValueError, match="boom 7"):
            await f
        assert isinstance(await f.exception(), ValueError)
        tb = await f.traceback()
        assert tb is not None and "boom" in "".join(traceback.format_tb(tb))


async def test_dask_collections_and_as_completed(cluster: Any, anyio_backend: str) -> None:
    async with Client(cluster.scheduler_address, asynchronous=True) as c:
        x = da.arange(100, chunks=10)
        assert await c.compute(x.sum()) == sum(range(100))
        persisted = c.persist(x + 1)
        assert int(await c.compute(persisted.sum())) == sum(range(1, 101))
        seen = []
        async for future, value in as_completed(c.map(inc, range(8)), with_results=True):
            assert value == await future
            seen.append(value)
        assert sorted(seen) == list(range(1, 9))


async def test_many_concurrent_awaits(cluster: Any, anyio_backend: str) -> None:
    results: dict[int, int] = {}
    async with Client(cluster.scheduler_address, asynchronous=True) as c:

        async def one(i: int) -> None:
            results[i] = await c.submit(inc, i, key=f"concurrent-{anyio_backend}-{i}")

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(one, i)
    assert results == {i: i + 1 for i in range(50)}


async def test_cancelling_the_caller_leaves_the_client_usable(
    cluster: Any, anyio_backend: str
) -> None:
    async with Client(cluster.scheduler_address, asynchronous=True) as c:
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.05):
                await c.submit(slow, 1.0, key=f"slow-{anyio_backend}")
        with anyio.move_on_after(0.05) as scope:
            await c.gather(c.map(slow, [1.0, 1.0], key=[f"s{anyio_backend}1", f"s{anyio_backend}2"]))
        assert scope.cancelled_caught
        assert await c.submit(inc, 5) == 6


async def test_plugins_and_task_metadata(cluster: Any, anyio_backend: str) -> None:
    async with Client(cluster.scheduler_address, asynchronous=True) as c:
        replies = await c.register_plugin(Marker())
        assert sorted(replies) == sorted(cluster.worker_addresses)
        assert set((await c.run(_marker)).values()) == {"set by the test"}
        await c.unregister_worker_plugin("async-marker")
        async with get_task_metadata() as tasks:
            assert await c.submit(inc, 1, key=f"meta-{anyio_backend}") == 2
        assert tasks.state == {f"meta-{anyio_backend}": "memory"}


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def increment(self) -> int:
        self.n += 1
        return self.n


async def test_actors_and_coordination_primitives(cluster: Any, anyio_backend: str) -> None:
    from trioscheduler import Lock, Queue, Variable

    async with Client(cluster.scheduler_address, asynchronous=True) as c:
        counter = await c.submit(Counter, actor=True)
        assert [await counter.increment() for _ in range(3)] == [1, 2, 3]
        lock = Lock(f"async-lock-{anyio_backend}")
        async with lock:
            assert await lock.locked()
        var = Variable(f"async-var-{anyio_backend}")
        await var.set(7)
        assert await var.get() == 7
        queue = Queue(f"async-queue-{anyio_backend}")
        await queue.put("item")
        assert await queue.get() == "item"


async def test_own_cluster_and_close(anyio_backend: str) -> None:
    async with Client(asynchronous=True, n_workers=1, processes=False) as c:
        assert await c.submit(inc, 1) == 2
        await c.close()
        assert c.status == "closed"
        with pytest.raises(ClientClosedError):
            c.submit(inc, 2)
    assert c.status == "closed"


async def test_the_sync_client_refuses_await(cluster: Any, anyio_backend: str) -> None:
    client = await anyio.to_thread.run_sync(Client, cluster.scheduler_address)
    try:
        future = client.submit(inc, 1)
        with pytest.raises(TypeError, match="sync Client"):
            await future
        assert await anyio.to_thread.run_sync(future.result) == 2
    finally:
        await anyio.to_thread.run_sync(client.close)
