"""The sync Client: the background loop thread, LocalCluster in threads and in processes.

Each test drives the blocking API from a worker thread under ``trio.fail_after``, so a
hang fails the test instead of the run.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import psutil
import pytest
import trio

from trioscheduler import (
    Client,
    Executor,
    FutureCancelledError,
    LocalCluster,
    as_completed,
    wait,
)
from trioscheduler.deploy.loop import LoopError

T = TypeVar("T")
TIMEOUT = 60


async def in_thread(fn: Callable[[], T]) -> T:
    with trio.fail_after(TIMEOUT):
        return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


def inc(x: int) -> int:
    return x + 1


def slowinc(x: int, delay: float = 0.05) -> int:
    time.sleep(delay)
    return x + 1


def fail(x: Any) -> None:
    raise KeyError(f"missing {x}")


GATES: dict[str, threading.Event] = {}


def block(name: str) -> str:
    GATES.setdefault(name, threading.Event()).wait(TIMEOUT)
    return name


async def test_sync_client_with_threads_cluster() -> None:
    def body() -> None:
        with Client(processes=False, n_workers=2, threads_per_worker=1) as c:
            assert c.cluster is not None and c.status == "running"
            f = c.submit(inc, 1)
            assert f.result(timeout=TIMEOUT) == 2
            fs = c.map(inc, range(100))
            assert c.gather(fs) == list(range(1, 101))
            y = c.submit(inc, f)
            assert y.result() == 3
            assert len(c.scheduler_info()["workers"]) == 2
            err = c.submit(fail, 1)
            with pytest.raises(KeyError, match="missing 1"):
                err.result()
            assert isinstance(err.exception(), KeyError)
            assert "fail" in [fr.name for fr in traceback.extract_tb(err.traceback())]
            [data] = c.scatter([10])
            assert c.submit(inc, data).result() == 11
            cluster = c.cluster
        assert c.status == "closed"
        assert cluster.status == "closed"

    await in_thread(body)


async def test_wait_as_completed_and_callbacks() -> None:
    def body() -> None:
        with Executor(processes=False, n_workers=2, threads_per_worker=2) as c:
            fs = c.map(slowinc, range(8))
            done, not_done = wait(fs)
            assert done == set(fs) and not not_done
            gate = "sync-first-completed"
            blocked = c.submit(block, gate)
            quick = c.submit(inc, 5)
            done, not_done = wait([blocked, quick], return_when="FIRST_COMPLETED")
            assert quick in done and blocked in not_done
            with pytest.raises(TimeoutError):
                wait([blocked], timeout=0.05)
            with pytest.raises(TimeoutError):
                blocked.result(timeout=0.05)
            GATES[gate].set()
            assert blocked.result() == gate

            seen = []
            ac = as_completed(c.map(slowinc, range(5), delay=0.01))
            for future in ac:
                seen.append(future.result())
                if len(seen) == 1:
                    ac.add(c.submit(inc, 100))
            assert sorted(seen) == [1, 2, 3, 4, 5, 101]

            results = []
            for batch in as_completed(c.map(inc, range(10)), with_results=True).batches():
                results.extend(r for _, r in batch)
            assert sorted(results) == list(range(1, 11))

            with pytest.raises(KeyError):
                list(as_completed([c.submit(fail, 2)], with_results=True))
            out = list(as_completed([c.submit(fail, 3)], with_results=True, raise_errors=False))
            assert isinstance(out[0][1], KeyError)

            called = threading.Event()
            got: list[Any] = []

            def callback(fut: Any) -> None:
                got.append(fut.result())  # a callback may block on the client
                called.set()

            c.submit(inc, 41).add_done_callback(callback)
            assert called.wait(TIMEOUT)
            assert got == [42]

    await in_thread(body)


async def test_cancel_and_close_release_everything() -> None:
    def body() -> None:
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False)
        try:
            c = Client(cluster)
            gate = "sync-cancel"
            f = c.submit(block, gate)
            c.cancel([f])
            assert f.cancelled()
            with pytest.raises(FutureCancelledError):
                f.result()
            GATES.setdefault(gate, threading.Event()).set()
            g = c.submit(inc, 1)
            assert g.result() == 2
            assert cluster.scheduler is not None
            state = cluster.scheduler.state
            assert c.id in state.clients
            c.close()
            assert c.id not in state.clients
            assert not any(c.id in ts.wanted_by for ts in state.tasks.values())
            assert cluster.status == "running"  # not ours to close
        finally:
            cluster.close()

    await in_thread(body)


async def test_unreachable_scheduler() -> None:
    def body() -> None:
        with pytest.raises(OSError, match="127.0.0.1:9"):
            Client("tcp://127.0.0.1:9", timeout=0.3)

    await in_thread(body)


async def test_sync_client_inside_trio_raises_instead_of_deadlocking() -> None:
    # No fail_after needed: nothing here awaits; the point is that it returns at once.
    with pytest.raises(LoopError, match="asynchronous"):
        Client("tcp://127.0.0.1:9", timeout=0.3)


def _under_asyncio() -> tuple[int, int, list[int]]:
    """An asyncio program: the asynchronous client works there (``client/bridge.py``), and
    so does the sync client used through ``asyncio.to_thread``."""
    import asyncio

    async def main() -> tuple[int, int, list[int]]:
        async with Client(processes=False, n_workers=1, asynchronous=True) as c:
            direct = await c.submit(inc, 1)
        client = Client(processes=False, n_workers=1, threads_per_worker=1)
        try:
            one = await asyncio.to_thread(client.submit(inc, 1).result)
            many = await asyncio.to_thread(client.gather, client.map(inc, range(3)))
        finally:
            await asyncio.to_thread(client.close)
        return direct, one, many

    return asyncio.run(main())


async def test_asyncio_users_can_use_either_client() -> None:
    assert await in_thread(_under_asyncio) == (2, 2, [1, 2, 3])


@pytest.mark.slow
async def test_sync_client_with_process_cluster() -> None:
    def body() -> None:
        me = psutil.Process()
        before = {p.pid for p in me.children(recursive=True)}
        with Client(n_workers=2, threads_per_worker=1, memory_limit=0) as c:
            c.wait_for_workers(2, timeout=TIMEOUT)
            assert c.scheduler_address is not None
            assert c.scheduler_address.startswith("tcp://")
            fs = c.map(inc, range(20))
            x = c.submit(sum, fs)
            assert x.result(timeout=TIMEOUT) == sum(range(1, 21))
            with pytest.raises(KeyError, match="missing 7") as info:
                c.submit(fail, 7).result()
            assert "fail" in [fr.name for fr in traceback.extract_tb(info.value.__traceback__)]
            big = c.scatter(list(range(1000)), hash=False)
            assert c.gather(c.submit(len, big)) == 1000
            assert len(c.nthreads()) == 2
            children = {p.pid for p in me.children(recursive=True)} - before
            assert len(children) >= 2
        left = [p for p in psutil.Process().children(recursive=True) if p.pid in children]
        gone, alive = psutil.wait_procs(left, timeout=TIMEOUT)
        assert not alive

    await in_thread(body)


async def test_sync_futures_are_not_awaited_or_async_iterated() -> None:
    c = await in_thread(lambda: Client(processes=False, n_workers=1))
    try:
        f = await in_thread(lambda: c.submit(inc, 1))
        with pytest.raises(TypeError, match="sync Client"):
            await f
        with pytest.raises(TypeError, match="plain 'for'"):
            async for _ in as_completed([f]):
                pass  # pragma: no cover
        assert await in_thread(f.result) == 2
    finally:
        await in_thread(c.close)


async def test_a_thread_waiting_in_result_sees_cancel_and_close() -> None:
    """``result()`` blocks its thread (woken straight from the loop): a cancel from
    another thread, or closing the client, ends the wait with an error, not a hang."""

    def body() -> None:
        with Client(processes=False, n_workers=1, threads_per_worker=2) as c:
            gate = "sync-result-cancel"
            f = c.submit(block, gate)
            errors: list[BaseException] = []

            def wait_for(fut: Any) -> None:
                try:
                    fut.result()
                except BaseException as exc:  # noqa: BLE001 - recorded for the assert
                    errors.append(exc)

            waiter = threading.Thread(target=wait_for, args=(f,))
            waiter.start()
            time.sleep(0.05)
            f.cancel()
            waiter.join(TIMEOUT)
            assert not waiter.is_alive()
            assert [type(e) for e in errors] == [FutureCancelledError]

            g = c.submit(block, gate + "-2")
            waiter = threading.Thread(target=wait_for, args=(g,))
            waiter.start()
            time.sleep(0.05)
            c.close()
            waiter.join(TIMEOUT)
            assert not waiter.is_alive()
            assert len(errors) == 2  # cancelled, or the client is closed: either way, not stuck
            GATES[gate].set()
            GATES[gate + "-2"].set()

    await in_thread(body)
