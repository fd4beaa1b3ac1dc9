"""A block's own error leaves every server and cluster ``async with`` as itself: no
``ExceptionGroup``, and not lost when an enclosing scope was cancelled meanwhile (the
trio pitfall ``wire/_nursery.py`` describes: re-raising after a nursery's exit loses the
error when that exit raises ``Cancelled`` first)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
import trio

from trioscheduler import Client
from trioscheduler.deploy.cluster import LocalCluster
from trioscheduler.server.nanny import Nanny
from trioscheduler.server.scheduler import Scheduler
from trioscheduler.server.worker import Worker
from trioscheduler.wire import background_nursery

TIMEOUT = 60


async def _raises_through(make: Callable[[], AbstractAsyncContextManager[Any]]) -> None:
    with pytest.raises(KeyError, match="mine"):
        async with make():
            raise KeyError("mine")
    with pytest.raises(KeyError, match="mine"):
        with trio.CancelScope() as outer:
            async with make():
                outer.cancel()
                raise KeyError("mine")


@pytest.mark.parametrize("kind", ["worker", "nanny", "client"])
async def test_a_servers_block_error_comes_out_as_itself(kind: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with Scheduler("tcp://127.0.0.1:0") as s:
            make: Callable[[], AbstractAsyncContextManager[Any]] = {
                "worker": lambda: Worker(s.address, nthreads=1, memory_limit=0),
                "nanny": lambda: Nanny(s.address, nthreads=1, memory_limit=0),
                "client": lambda: Client(s.address, asynchronous=True),
            }[kind]
            await _raises_through(make)


async def test_a_local_clusters_block_error_comes_out_as_itself() -> None:
    with trio.fail_after(TIMEOUT):
        await _raises_through(
            lambda: LocalCluster(n_workers=1, processes=False, asynchronous=True)
        )


async def test_a_schedulers_block_error_comes_out_as_itself() -> None:
    with trio.fail_after(TIMEOUT):
        await _raises_through(lambda: Scheduler("tcp://127.0.0.1:0"))


async def test_a_failed_background_task_comes_out_not_the_blocks_cancellation() -> None:
    async def boom() -> None:
        raise ValueError("background")

    with trio.fail_after(TIMEOUT), pytest.raises(BaseExceptionGroup) as info:
        async with background_nursery() as nursery:
            nursery.start_soon(boom)
            await trio.sleep_forever()
    assert info.value.subgroup(ValueError) is not None
    assert info.value.subgroup(trio.Cancelled) is None
