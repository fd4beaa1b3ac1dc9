"""Tasks that launch tasks: worker_client, get_client, secede/rejoin, on real clusters."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio

from trioscheduler import (
    Client,
    Scheduler,
    Worker,
    get_client,
    get_worker,
    local_client,
    rejoin,
    secede,
    worker_client,
)
from trioscheduler.deploy.loop import LoopError

TIMEOUT = 60


@asynccontextmanager
async def cluster(scheme: str, n: int = 2) -> AsyncIterator[tuple[Client, list[Worker]]]:
    """A scheduler, ``n`` single-threaded workers and an async client."""
    address = f"inproc://wc-{os.getpid()}" if scheme == "inproc" else "tcp://127.0.0.1:0"
    async with AsyncExitStack() as stack:
        s = await stack.enter_async_context(Scheduler(address))
        workers = [
            await stack.enter_async_context(Worker(s.address, nthreads=1, memory_limit=0))
            for _ in range(n)
        ]
        c = await stack.enter_async_context(Client(s.address, asynchronous=True))
        await c.wait_for_workers(n)
        yield c, workers


def fib(n: int) -> int:
    if n < 2:
        return n
    with worker_client() as client:
        a = client.submit(fib, n - 1)
        b = client.submit(fib, n - 2)
        return int(a.result() + b.result())


def submit_to(target: str) -> tuple[str, str]:
    """Launch a sub-task restricted to ``target``; where did each run?"""
    with local_client() as client:
        f = client.submit(lambda: get_worker().address, workers=[target], pure=False)
        return get_worker().address, f.result()


def secede_and_rejoin(x: int) -> int:
    secede()
    client = get_client()
    y = client.submit(lambda v: v * 10, x).result()
    rejoin()
    rejoin()  # a second rejoin does nothing
    return int(y) + 1


async def test_recursive_fibonacci_on_two_single_threaded_workers() -> None:
    with trio.fail_after(TIMEOUT):
        for scheme in ("inproc", "tcp"):
            async with cluster(scheme) as (c, _):
                # 177 tasks, each waiting on two sub-tasks: without seceding, two would
                # fill both thread slots and deadlock.
                assert await c.submit(fib, 10) == 55


async def test_launched_tasks_are_restricted_like_any_other() -> None:
    with trio.fail_after(TIMEOUT):
        for scheme in ("inproc", "tcp"):
            async with cluster(scheme) as (c, workers):
                a, b = (w.address for w in workers)
                ran_on, sub_ran_on = await c.submit(submit_to, b, workers=[a])
                assert (ran_on, sub_ran_on) == (a, b)


async def test_secede_get_client_rejoin_by_hand() -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster("inproc", n=1) as (c, _):
            assert await c.gather(c.map(secede_and_rejoin, range(4))) == [1, 11, 21, 31]


async def test_get_client_outside_a_task_is_the_default_client_and_async_tasks_are_told() -> None:
    async def in_async_task() -> None:
        get_client()

    with trio.fail_after(TIMEOUT):
        async with cluster("inproc", n=1) as (c, _):
            with pytest.raises(LoopError, match="asynchronous=True"):
                await c.submit(in_async_task)

    def sync_side() -> None:
        with Client(processes=False, n_workers=1, threads_per_worker=1) as client:
            assert get_client() is client
            assert client.submit(fib, 6).result() == 8

    with trio.fail_after(TIMEOUT):
        await trio.to_thread.run_sync(sync_side)
