"""Actors on real worker processes: ``submit(Cls, actor=True)``, method calls and
attribute reads straight to the worker, from the client (sync and async) and tasks."""

from __future__ import annotations

import os
import pickle
import signal
import threading
import traceback
from typing import Any

import pytest
import trio

from trioscheduler import (
    Actor,
    ActorFuture,
    BaseActorFuture,
    Client,
    LocalCluster,
    Lock,
    Security,
    TrioSchedulerError,
)
from trioscheduler.deploy.cluster import open_cluster

TIMEOUT = 60


class Counter:
    kind = "counter"

    def __init__(self, start: int = 0) -> None:
        self.n = start
        self.threads: set[int] = set()

    def increment(self, by: int = 1) -> int:
        self.threads.add(threading.get_ident())
        self.n += by
        return self.n

    async def ainc(self) -> int:
        self.n += 1
        return self.n

    def pid(self) -> int:
        return os.getpid()

    def fail(self) -> None:
        raise ValueError(f"counter at {self.n} refuses")

    def unpicklable(self) -> Any:
        return threading.Lock()

    @property
    def double(self) -> int:
        return 2 * self.n


def add_through(counter: Actor, by: int) -> int:
    """A task calling an actor (on another worker, or the same)."""
    return counter.increment(by).result()


async def add_through_async(counter: Actor, by: int) -> list[int]:
    """An ``async def`` task calling an actor: awaited, through the worker's own loop."""
    n = await counter.increment(by)
    return [n, await counter.n]


async def test_actor_calls_from_async_client_and_tasks() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_cluster(2, 1, memory_limit=0) as cluster:
            async with Client(cluster, asynchronous=True) as c:
                future = c.submit(Counter, 5, actor=True)
                counter = await future
                assert isinstance(counter, Actor)
                assert repr(counter) == f"<Actor: Counter, key={future.key}>"
                assert future.key.startswith("Counter-")
                call = counter.increment()
                assert isinstance(call, ActorFuture) and isinstance(call, BaseActorFuture)
                assert await call == 6
                assert await counter.increment(by=4) == 10
                assert await counter.ainc() == 11
                assert await counter.n == 11  # attribute read on the worker
                assert await counter.double == 22
                assert await counter.kind == "counter"
                # the instance lives in a worker process, not here
                assert await counter.pid() != os.getpid()
                # calls from tasks reach the same instance
                seen = await c.gather(c.map(add_through, [counter] * 3, [1, 2, 3]))
                assert max(seen) == 17 and len(set(seen)) == 3
                assert await counter.n == 17
                # and from async tasks, awaited on the worker's loop
                assert await c.submit(add_through_async, counter, 100) == [117, 117]
                assert await counter.n == 117
                # every plain method call ran on one thread: no lock needed in the actor
                assert len(await counter.threads) == 1
                # two submits are two actors (actors are never pure)
                other = await c.submit(Counter, 5, actor=True)
                assert other.key != counter.key
                assert await other.increment() == 6

                with pytest.raises(ValueError, match="counter at 117 refuses") as info:
                    await counter.fail()
                # the actor's frame travels as a real traceback (tblib, issue 13)
                assert "fail" in [fr.name for fr in traceback.extract_tb(info.value.__traceback__)]
                with pytest.raises(TypeError, match="cannot be pickled"):
                    await counter.unpicklable()
                with pytest.raises(TypeError, match="cannot be pickled"):
                    counter.increment(threading.Lock())
                with pytest.raises(AttributeError):
                    await counter.no_such_attribute
                with pytest.raises(TypeError, match="needs a class"):
                    c.submit(len, [1], actor=True)
                assert await counter.n == 117  # none of that changed the actor

                actors = await c.gather(c.map(Counter, [10, 20], actor=True))
                assert [await a.increment() for a in actors] == [11, 21]


def pid_of(dask_worker: Any) -> int:
    return os.getpid()


async def test_actor_released_or_worker_killed_gives_clear_errors() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_cluster(2, 1, memory_limit=0) as cluster:
            async with Client(cluster, asynchronous=True) as c:
                future = c.submit(Counter, actor=True)
                counter = await future
                assert await counter.increment() == 1
                holder = counter._address
                del future  # the handle itself keeps the actor alive, as dask's does
                await trio.sleep(0.1)
                assert await counter.increment() == 2
                copy = pickle.loads(pickle.dumps(counter))  # a handle holding nothing
                assert await copy.increment() == 3
                del counter  # the last holder of the key: the worker drops the instance
                with trio.fail_after(10):
                    while True:
                        try:
                            await copy.increment()
                        except ValueError as exc:
                            assert "no actor" in str(exc) and "released" in str(exc)
                            break
                        await trio.sleep(0.02)
                future = c.submit(Counter, actor=True, workers=[holder])
                counter = await future
                pids = await c.run(pid_of, workers=[holder])
                os.kill(pids[holder], signal.SIGKILL)
                with pytest.raises(TrioSchedulerError, match="the actor is lost"):
                    with trio.fail_after(20):
                        while True:  # until the dead worker's port refuses
                            await counter.increment()
                            await trio.sleep(0.02)


def test_actor_with_sync_client() -> None:
    with LocalCluster(n_workers=1, threads_per_worker=1, memory_limit=0) as cluster:
        with Client(cluster) as c:
            counter = c.submit(Counter, 1, actor=True).result()
            calls = [counter.increment() for _ in range(5)]  # all on their way at once
            # one at a time on the worker, in arrival order (separate connections)
            assert sorted(f.result(timeout=10) for f in calls) == [2, 3, 4, 5, 6]
            assert all(f.done() for f in calls)
            assert counter.n == 6
            assert counter.double == 12
            with pytest.raises(ValueError, match="refuses"):
                counter.fail().result()
            assert c.submit(add_through, counter, 4).result() == 10


async def locked_actor_call(counter: Actor) -> int:
    """An async task in a TLS cluster: its worker's asynchronous client presents the
    worker's certificate to the scheduler, its actor call to the other worker."""
    async with Lock("tls-lock"):
        return int(await counter.increment(5))


async def test_actors_and_locks_in_a_tls_cluster() -> None:
    pytest.importorskip("cryptography")
    sec = Security.temporary()
    with trio.fail_after(TIMEOUT):
        async with open_cluster(2, 1, memory_limit=0, security=sec) as cluster:
            async with Client(cluster, asynchronous=True, security=sec) as c:
                future = c.submit(Counter, actor=True)
                counter = await future
                assert counter._address.startswith("tls://")
                assert await counter.increment() == 1
                assert await c.submit(locked_actor_call, counter) == 6
                assert await counter.n == 6
                async with Lock("tls-lock"):
                    assert await Lock("tls-lock").locked()
