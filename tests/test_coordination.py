"""Lock, Semaphore, MultiLock, Event, Variable and Queue on real clusters: worker
processes under nannies, used from the client (async and sync) and from inside tasks."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from trioscheduler import (
    Client,
    Event,
    Future,
    LocalCluster,
    Lock,
    MultiLock,
    Queue,
    Semaphore,
    TimeoutError,
    TrioSchedulerError,
    Variable,
)
from trioscheduler.deploy.cluster import open_cluster

TIMEOUT = 60


# -- what tasks run (module level: workers import them by reference) ---------------------


def bump_under_lock(i: int, path: str, lock: Lock) -> int:
    """A read-modify-write of a file that loses updates unless the lock excludes."""
    with lock:
        n = int(Path(path).read_text())
        time.sleep(0.01)
        Path(path).write_text(str(n + 1))
    return i


def track_concurrency(i: int, path: str, sem_name: str) -> int:
    """Under ``Semaphore(2)``: the most holders seen at once (counted in a file, under a
    Lock) is returned."""
    guard = Lock("track-guard")

    def add(d: int) -> int:
        with guard:
            now, most = (int(x) for x in Path(path).read_text().split())
            now += d
            most = max(most, now)
            Path(path).write_text(f"{now} {most}")
            return most

    with Semaphore(2, sem_name):
        add(1)
        time.sleep(0.05)
        return add(-1)


def hold_lease_until(sem_name: str, stop: str) -> int:
    """Take the lease, say which process holds it, keep it until ``stop`` is set."""
    sem = Semaphore(1, sem_name)
    assert sem.acquire()
    Queue("holders").put(os.getpid())
    Event(stop).wait()
    sem.release()
    return os.getpid()


def wait_for_event(name: str, timeout: float | None) -> bool:
    return Event(name).wait(timeout)


def set_variable(name: str, value: Any) -> None:
    Variable(name).set(value)


def put_items(name: str, items: list[Any]) -> int:
    q = Queue(name)
    for item in items:
        q.put(item)
    return len(items)


def inc(x: int) -> int:
    return x + 1


async def async_task_uses_primitives(i: int) -> list[Any]:
    """An ``async def`` task: the primitives reach the scheduler through the worker's
    asynchronous client, and are awaited."""
    async with Lock("async-lock"):
        await Queue("async-q").put(i)
    async with Semaphore(2, "async-sem"):
        await Variable(f"async-v-{i}").set({"i": i})
    return [await Variable(f"async-v-{i}").get(timeout=5), await Event("async-e").wait(0)]


# -- locks ---------------------------------------------------------------------------------


async def test_lock_excludes_tasks_on_worker_processes(tmp_path: Path) -> None:
    path = tmp_path / "counter"
    path.write_text("0")
    with trio.fail_after(TIMEOUT):
        async with open_cluster(2, 2, memory_limit=0) as cluster:
            async with Client(cluster, asynchronous=True) as c:
                lock = Lock("counter-lock")
                futures = c.map(bump_under_lock, range(12), path=str(path), lock=lock)
                assert await c.gather(futures) == list(range(12))
                assert path.read_text() == "12"  # no update lost: never held twice
                assert not await lock.locked()


async def test_lock_timeouts_and_bad_release() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_cluster(1, 1, memory_limit=0) as cluster:
            async with Client(cluster, asynchronous=True) as c:
                a, b = Lock("x", client=c), Lock("x", client=c)
                assert await a.acquire()
                assert await a.locked()
                assert await b.acquire(timeout=0.1) is False  # held by a
                assert await b.acquire(blocking=False) is False
                with pytest.raises(ValueError, match="timeout for a non-blocking call"):
                    b.acquire(blocking=False, timeout=1)
                with pytest.raises(RuntimeError, match="not held by this Lock object"):
                    b.release()  # b never held it: a keeps it
                assert await a.locked()

                async with trio.open_nursery() as nursery:  # b waits; a's release wakes it
                    got: list[bool] = []

                    async def take() -> None:
                        got.append(await b.acquire())

                    nursery.start_soon(take)
                    await trio.sleep(0.05)
                    assert not got
                    assert await a.release() is True
                assert got == [True]
                with pytest.raises(RuntimeError, match="not held"):
                    a.release()
                await b.release()
                assert not await a.locked()
                with pytest.raises(TypeError, match="name must be a str"):
                    Lock(3)  # type: ignore[arg-type]


async def test_malformed_requests_get_an_error_naming_the_field() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_cluster(1, 1, memory_limit=0) as cluster:
            async with Client(cluster, asynchronous=True) as c:
                with pytest.raises(TrioSchedulerError, match="unknown coordination request 'nope'"):
                    await c.rpc({"op": "coord", "kind": "nope"})
                with pytest.raises(TrioSchedulerError, match="sem_release: name must be a str"):
                    await c.rpc({"op": "coord", "kind": "sem_release", "name": 1, "lease": "x"})
                with pytest.raises(TrioSchedulerError, match="timeout must be a number"):
                    await c.rpc(
                        {"op": "coord_wait", "kind": "event_wait", "name": "e", "timeout": "1s"}
                    )
                with pytest.raises(
                    TrioSchedulerError, match="may wait: send it as op 'coord_wait'"
                ):
                    await c.rpc({"op": "coord", "kind": "event_wait", "name": "e", "timeout": 0})
                # the scheduler and this client's connections are fine
                assert await Event("e").wait(0) is False
                assert await c.submit(inc, 1) == 2


# -- semaphores ------------------------------------------------------------------------------


async def test_semaphore_bounds_tasks_and_checks_max_leases(tmp_path: Path) -> None:
    path = tmp_path / "holders"
    path.write_text("0 0")
    with trio.fail_after(TIMEOUT):
        async with open_cluster(2, 2, memory_limit=0) as cluster:
            async with Client(cluster, asynchronous=True) as c:
                most = await c.gather(
                    c.map(track_concurrency, range(8), path=str(path), sem_name="s2")
                )
                assert max(most) <= 2
                assert path.read_text().split()[0] == "0"
                assert await Semaphore(2, "s2").get_value() == 0
                held = Semaphore(2, "s2")
                assert await held.acquire()
                with pytest.raises(ValueError, match="max_leases=2, asked with max_leases=3"):
                    await Semaphore(3, "s2").acquire()
                with pytest.raises(ValueError, match="max_leases must be an int"):
                    Semaphore(0)
                with pytest.raises(RuntimeError, match="released too often"):
                    Semaphore(2, "s2").release()
                assert await held.release()


async def test_semaphore_lease_returned_when_its_worker_is_killed() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_cluster(2, 1, memory_limit=0) as cluster:
            async with Client(cluster, asynchronous=True) as c:
                sem = Semaphore(1, "one-lease")
                holder = c.submit(hold_lease_until, "one-lease", "stop", pure=False)
                pid = await Queue("holders").get(timeout=30)
                assert await sem.get_value() == 1
                assert await sem.acquire(timeout=0.1) is False  # the task holds it
                waiting: list[bool] = []
                async with trio.open_nursery() as nursery:

                    async def take() -> None:
                        waiting.append(await sem.acquire())

                    nursery.start_soon(take)
                    os.kill(pid, signal.SIGKILL)
                assert waiting == [True]  # the waiter got it: the dead worker's lease returned
                assert await sem.get_value() == 1
                assert await sem.release()
                # the task ran again elsewhere (its worker died) and waited for the lease
                assert await Queue("holders").get(timeout=30) != pid
                await Event("stop").set()
                assert await holder != pid
                assert await sem.get_value() == 0


# -- events ----------------------------------------------------------------------------------


async def test_event_between_client_and_tasks() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_cluster(1, 2, memory_limit=0) as cluster:
            async with Client(cluster, asynchronous=True) as c:
                ev = Event("go")
                assert await c.submit(wait_for_event, "go", 0.1) is False
                waiter = c.submit(wait_for_event, "go", None)
                assert not await ev.is_set()
                assert await ev.wait(timeout=0.05) is False
                await ev.set()
                assert await waiter is True
                assert await ev.is_set() and await ev.wait()
                await ev.clear()
                assert not await ev.is_set()


# -- variables -------------------------------------------------------------------------------


async def test_variable_values_futures_and_timeout() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_cluster(2, 1, memory_limit=0) as cluster:
            async with Client(cluster, asynchronous=True) as c:
                v = Variable("v")
                with pytest.raises(TimeoutError, match="'v' had no value"):
                    await v.get(timeout=0.2)
                await c.submit(set_variable, "v", {"from": "a task"})
                assert await v.get() == {"from": "a task"}
                f = c.submit(inc, 41)
                await v.set(f)
                del f  # the variable keeps the key in memory
                got = await v.get(timeout=5)
                assert isinstance(got, Future) and await got == 42
                del got
                await trio.sleep(0.1)
                again = await v.get()
                assert await again == 42
                await v.delete()
                with pytest.raises(TimeoutError):
                    await v.get(timeout=0.05)
                with pytest.raises(TypeError, match="cannot be pickled"):
                    v.set(threading.Lock())
                with pytest.raises(TypeError, match="unexpected keyword"):
                    v.get(bogus=1)


# -- queues ---------------------------------------------------------------------------------


async def test_queue_put_get_batches_and_bad_items() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_cluster(2, 1, memory_limit=0) as cluster:
            async with Client(cluster, asynchronous=True) as c:
                q = Queue("jobs")
                assert await c.submit(put_items, "jobs", [1, 2, 3, 4]) == 4
                assert await q.qsize() == 4
                assert await q.get() == 1
                assert await q.get(batch=2) == [2, 3]
                assert await q.get(batch=True) == [4]
                assert await q.get(batch=True) == []
                with pytest.raises(TimeoutError, match="'jobs' had no item"):
                    await q.get(timeout=0.1)
                with pytest.raises(
                    TypeError, match=r"cannot put .* in Queue 'jobs'.*nothing was sent"
                ):
                    q.put(threading.Lock())
                assert await q.qsize() == 0  # nothing half-sent
                with pytest.raises(ValueError, match="batch must be"):
                    q.get(batch=0)
                # a future in the queue stays computed until someone takes it
                await q.put(c.submit(inc, 1, key="queued-future"))
                (f,) = await q.get(batch=True)
                assert isinstance(f, Future) and await f == 2

                small = Queue("small", maxsize=1)
                await small.put("a")
                with pytest.raises(TimeoutError, match="'small' had no room"):
                    await small.put("b", timeout=0.1)
                async with trio.open_nursery() as nursery:  # a put waits for room
                    nursery.start_soon(small.put, "c")
                    await trio.sleep(0.05)
                    assert await small.get() == "a"
                assert await small.get(timeout=5) == "c"


# -- multi-locks -----------------------------------------------------------------------------


async def test_multilock_all_or_some_names() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_cluster(1, 1, memory_limit=0) as cluster:
            async with Client(cluster, asynchronous=True):
                ab = MultiLock(["a", "b"])
                bc = MultiLock(["b", "c"])
                assert await ab.acquire()
                assert ab.locked()
                assert await bc.acquire(timeout=0.1) is False  # b is held
                assert not bc.locked()
                any_of = MultiLock(["b", "c"])
                assert await any_of.acquire(num_locks=1)  # c is free
                await ab.release()
                assert await bc.acquire(blocking=False) is False  # any_of holds c
                await any_of.release()
                assert await bc.acquire(timeout=5)
                await bc.release()
                with pytest.raises(ValueError, match="not yet acquired"):
                    bc.release()


# -- async tasks ----------------------------------------------------------------------------


async def test_primitives_inside_async_tasks() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_cluster(2, 2, memory_limit=0) as cluster:
            async with Client(cluster, asynchronous=True) as c:
                results = await c.gather(c.map(async_task_uses_primitives, range(4)))
                assert results == [[{"i": i}, False] for i in range(4)]
                assert sorted(await Queue("async-q").get(batch=True)) == [0, 1, 2, 3]
                assert not await Lock("async-lock").locked()
                assert await Semaphore(2, "async-sem").get_value() == 0


# -- the sync client --------------------------------------------------------------------------


def test_sync_client_context_managers_and_pickled_primitives(tmp_path: Path) -> None:
    path = tmp_path / "counter"
    path.write_text("0")
    with LocalCluster(n_workers=1, threads_per_worker=2, memory_limit=0) as cluster:
        with Client(cluster) as c:
            lock = Lock("sync-lock")
            with lock:
                assert lock.locked()
            assert not lock.locked()
            assert c.gather(c.map(bump_under_lock, range(4), path=str(path), lock=lock)) == [
                0,
                1,
                2,
                3,
            ]
            assert path.read_text() == "4"
            v = Variable("sync-v")
            with pytest.raises(TimeoutError):
                v.get(timeout=0.1)
            v.set([1, 2])
            assert v.get() == [1, 2]
            q = Queue("sync-q")
            q.put("x")
            assert q.get(timeout=5) == "x"
            e = Event("sync-e")
            e.set()
            assert e.wait(1)
