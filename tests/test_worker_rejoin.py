"""A worker that loses its scheduler stream rejoins it (issue 18), in one process.

Across real hosts, with a cut link and a killed scheduler: ``tests/test_netns.py``.
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import Any

import pytest
import trio

from polling import wait_until
from trioscheduler.client.client import Client
from trioscheduler.server.scheduler import Scheduler
from trioscheduler.server.worker import Worker

TIMEOUT = 60
_calls = itertools.count()
CALLS: list[int] = []


def counted(x: int) -> int:
    CALLS.append(next(_calls))
    return x + 1



async def test_a_dropped_stream_is_rejoined_and_the_held_value_offered_again() -> None:
    CALLS.clear()
    with trio.fail_after(TIMEOUT):
        async with (
            Scheduler("tcp://127.0.0.1:0") as s,
            Worker(s.address, nthreads=1, memory_limit=0) as w,
            Client(s.address, asynchronous=True) as c,
        ):
            x = c.submit(counted, 1)
            assert await x == 2 and len(CALLS) == 1
            assert w._stream is not None
            await w._stream.aclose()  # the connection drops under the worker
            await wait_until(lambda: w.reconnections == 1)
            await wait_until(lambda: w.address in s.state.workers)
            # the scheduler took the value back from the worker's registration: not rerun
            await wait_until(lambda: s.state.tasks[x.key].state == "memory")
            assert await x == 2 and len(CALLS) == 1
            assert await c.submit(counted, 10, workers=[w.address]) == 11
            assert w.status == "running"


async def _serve(
    address: str, stop: trio.Event, *, close_workers: bool = False, task_status: Any
) -> None:
    """A scheduler in a task of its own, so that it can stop while the worker runs
    (restarted on purpose: ``close_workers=False``, the workers stay)."""
    async with Scheduler(address, close_workers=close_workers) as s:
        task_status.started(s)
        await stop.wait()


async def test_a_restarted_scheduler_at_the_same_address_gets_the_worker_back() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            stop = trio.Event()
            s: Scheduler = await nursery.start(_serve, "tcp://127.0.0.1:0", stop)
            address = s.address
            async with Worker(address, nthreads=1, memory_limit=0, death_timeout=30) as w:
                async with Client(address, asynchronous=True) as c:
                    x = c.submit(counted, 5)
                    assert await x == 6
                stop.set()  # the scheduler stops, the worker keeps running
                await wait_until(lambda: w._batched is None)
                stop = trio.Event()
                s2: Scheduler = await nursery.start(_serve, address, stop)
                await wait_until(lambda: w.reconnections == 1)
                assert w.status == "running" and w.address in s2.state.workers
                async with Client(address, asynchronous=True) as c:
                    assert await c.submit(counted, 7, workers=[w.address]) == 8
                stop.set()


async def test_an_orderly_close_closes_the_workers_whatever_their_death_timeout() -> None:
    """dask's ``Scheduler.close``: the workers are told to close, whatever their
    ``death_timeout`` (here: for ever)."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            stop = trio.Event()
            s: Scheduler = await nursery.start(
                partial(_serve, close_workers=True), "tcp://127.0.0.1:0", stop
            )
            async with Worker(s.address, nthreads=1, memory_limit=0, death_timeout=None) as w:
                stop.set()
                await w.finished()
                assert w.close_reason == "the scheduler asked: scheduler-close"
                assert w.reconnections == 0


async def test_death_timeout_zero_closes_at_once_and_a_bad_one_is_refused() -> None:
    with trio.fail_after(TIMEOUT):
        async with Scheduler("tcp://127.0.0.1:0") as s:
            async with Worker(s.address, memory_limit=0, death_timeout=0) as w:
                assert w._stream is not None
                await w._stream.aclose()
                await w.finished()
                assert "lost the scheduler" in w.close_reason
    with pytest.raises(ValueError, match="death_timeout"):
        Worker("tcp://127.0.0.1:1", death_timeout=-1)
