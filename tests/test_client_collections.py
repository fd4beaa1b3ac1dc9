"""Dask collections through the Client: compute, persist, get, and dask's default scheduler."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import trio
from dask import delayed

from trioscheduler import Client, Future, Scheduler, Worker

T = TypeVar("T")
TIMEOUT = 60
RUNS: dict[str, int] = {}
LOCK = threading.Lock()


def counted(name: str, value: int) -> int:
    with LOCK:
        RUNS[name] = RUNS.get(name, 0) + 1
    return value


def inc(x: int) -> int:
    return x + 1


async def in_thread(fn: Callable[[], T]) -> T:
    with trio.fail_after(TIMEOUT):
        return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


async def test_compute_and_persist_with_an_async_client() -> None:
    with trio.fail_after(TIMEOUT):
        async with Scheduler(f"inproc://collections-{os.getpid()}") as s:
            async with Worker(s.address, nthreads=2, memory_limit=0):
                async with Client(s.address, asynchronous=True) as c:
                    x = da.arange(100, chunks=10)
                    f = c.compute(x.sum())
                    assert isinstance(f, Future)
                    assert await f == 4950
                    a, b = c.compute([delayed(inc)(1), x.mean()])
                    assert await c.gather([a, b]) == [2, 49.5]
                    assert await c.compute(delayed(inc)(41), sync=True) == 42

                    name = "persisted-async"
                    p = c.persist(delayed(counted)(name, 5))
                    later = c.compute(delayed(inc)(p))
                    again = c.compute(delayed(inc)(p) + 1)
                    assert await c.gather([later, again]) == [6, 7]
                    assert RUNS[name] == 1  # the persisted value was not recomputed

                    y = c.persist(x * 2)
                    assert await c.compute(y.sum(), sync=True) == 9900
                    assert all(k in s.state.tasks for k in dask.core.flatten(y.__dask_keys__()))


async def test_sync_client_is_dasks_scheduler_while_open() -> None:
    def body() -> None:
        with Client(processes=False, n_workers=2, threads_per_worker=1) as c:
            pdf = pd.DataFrame({"g": [i % 3 for i in range(60)], "v": range(60)})
            df = dd.from_pandas(pdf, npartitions=4)
            result = df.groupby("g").v.sum().compute()  # no scheduler= : the client runs it
            pd.testing.assert_series_equal(result, pdf.groupby("g").v.sum())
            arr = np.arange(36.0).reshape(6, 6)
            x = da.from_array(arr, chunks=3)
            np.testing.assert_allclose((x @ x.T).compute(), arr @ arr.T)
            assert c.get({"a": 1, "b": (inc, "a")}, ["a", ["b"]]) == [1, [2]]
            name = "sync-persist"
            p = dask.persist(delayed(counted)(name, 3))[0]
            assert dask.compute(p + 1, p + 2) == (4, 5)
            assert RUNS[name] == 1
            state = c.cluster.scheduler.state
            assert not [k for k in state.tasks if "inc" in str(k)]  # get() released its keys
        assert dask.config.get("scheduler", None) is None

    await in_thread(body)


async def test_restrictions_apply_to_collection_tasks() -> None:
    with trio.fail_after(TIMEOUT):
        async with Scheduler(f"inproc://collections-r-{os.getpid()}") as s:
            async with (
                Worker(s.address, nthreads=1, memory_limit=0, name="a"),
                Worker(s.address, nthreads=1, memory_limit=0, name="b") as b,
            ):
                async with Client(s.address, asynchronous=True) as c:
                    await c.wait_for_workers(2)
                    x = da.ones(40, chunks=10)
                    y = c.persist(x + 1, workers="b")
                    await c.compute(y.sum(), sync=True)
                    who = await c.who_has()
                    for k in dask.core.flatten(y.__dask_keys__()):
                        assert b.address in who[k]  # computed there (maybe copied since)
                    with pytest.raises(TypeError, match="workers= takes"):
                        c.compute(x.sum(), workers=1.5)
