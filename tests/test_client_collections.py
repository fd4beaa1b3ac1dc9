"""Dask collections through the Client: compute, persist, get, and dask's default scheduler."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

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


FLAKY: dict[str, int] = {}


def flaky(name: str, x: int) -> int:
    """Fails the first time it runs for ``name``."""
    with LOCK:
        FLAKY[name] = FLAKY.get(name, 0) + 1
        first = FLAKY[name] == 1
    if first:
        raise RuntimeError("flaky")
    return x


def where(x: object) -> str:
    from trioscheduler import get_worker

    return get_worker().address


def collections_to_compare() -> dict[str, object]:
    import dask.bag as db

    pdf = pd.DataFrame({"g": [i % 4 for i in range(80)], "v": np.arange(80.0)})
    df = dd.from_pandas(pdf, npartitions=5)
    arr = da.from_array(np.arange(64.0).reshape(8, 8), chunks=(3, 5))
    bag = db.from_sequence(range(30), npartitions=4)
    d = delayed(sum)([delayed(inc)(i) for i in range(10)])
    return {
        "delayed": d,
        "array": (arr @ arr.T + arr.mean(axis=0)).sum(axis=1),
        "dataframe": df.groupby("g").v.agg(["sum", "mean"]),
        "merge": df.merge(df.rename(columns={"v": "w"}), on="g").w.sum(),
        "bag": bag.map(inc).filter(lambda x: x % 3).frequencies(),
        "bag-fold": bag.map(lambda x: x * x).sum(),
    }


def assert_same(name: str, got: Any, want: Any) -> None:
    if isinstance(want, pd.DataFrame):
        pd.testing.assert_frame_equal(got, want)
    elif isinstance(want, pd.Series):
        pd.testing.assert_series_equal(got, want)
    elif isinstance(want, np.ndarray):
        np.testing.assert_allclose(got, want)
    elif name == "bag":
        assert sorted(got) == sorted(want), name
    else:
        assert got == want, name


@pytest.mark.filterwarnings("ignore:Computing mixed collections:UserWarning")
async def test_results_equal_dasks_sync_scheduler_over_inproc_and_tcp() -> None:
    """Also a regression test: the same collections persisted by two clients in turn
    (a persisted dataframe's expression is deduplicated by dask by its futures' token)."""
    colls = collections_to_compare()
    want = dict(zip(colls, dask.compute(*colls.values(), scheduler="sync"), strict=True))
    with trio.fail_after(TIMEOUT):
        for address in (f"inproc://collections-eq-{os.getpid()}", "tcp://127.0.0.1:0"):
            async with Scheduler(address) as s:
                async with (
                    Worker(s.address, nthreads=2, memory_limit=0),
                    Worker(s.address, nthreads=1, memory_limit=0),
                    Client(s.address, asynchronous=True) as c,
                ):
                    got = await c.compute(list(colls.values()), sync=True)
                    for name, value in zip(colls, got, strict=True):
                        assert_same(name, value, want[name])
                    persisted = c.persist(list(colls.values()))
                    again = await c.compute(persisted, sync=True)
                    for name, value in zip(colls, again, strict=True):
                        assert_same(name, value, want[name])


async def test_options_and_annotations_reach_the_scheduler() -> None:
    with trio.fail_after(TIMEOUT):
        for address in (f"inproc://collections-opt-{os.getpid()}", "tcp://127.0.0.1:0"):
            async with Scheduler(address) as s:
                async with (
                    Worker(s.address, nthreads=1, memory_limit=0, name="plain") as plain,
                    Worker(s.address, nthreads=1, memory_limit=0, resources={"GPU": 1}) as gpu,
                    Client(s.address, asynchronous=True) as c,
                ):
                    await c.wait_for_workers(2)
                    # resources=: only the GPU worker qualifies
                    f = c.compute(
                        delayed(where)(1, dask_key_name=f"res-{address}"), resources={"GPU": 1}
                    )
                    assert await f == gpu.address
                    # dask.annotate on a layer: workers= and retries=
                    name = f"flaky-{address}"
                    with dask.annotate(workers=["plain"], retries=2):
                        x = delayed(flaky)(name, 5, dask_key_name=name)
                    y = delayed(where)(x, dask_key_name=f"where-{address}")
                    with dask.annotate(workers=["plain"]):
                        z = delayed(where)(x, dask_key_name=f"where-plain-{address}")
                    assert await c.compute([y, z], sync=True) in (
                        [gpu.address, plain.address],
                        [plain.address, plain.address],
                    )
                    assert FLAKY[name] == 2  # failed once, retried by the annotation
                    # retries= and priority= keywords, allow_other_workers= with a missing worker
                    name2 = f"flaky-kw-{address}"
                    g = c.compute(
                        delayed(flaky)(name2, 7, dask_key_name=name2), retries=1, priority=5
                    )
                    assert await g == 7
                    assert s.state.tasks[name2].priority[0] == -5
                    h = c.compute(
                        delayed(inc)(1, dask_key_name=f"aow-{address}"),
                        workers=["tcp://10.255.255.1:1"],
                        allow_other_workers=True,
                    )
                    assert await h == 2
                    # get() with keywords, as dask's scheduler interface
                    got = c.get({"a": 1, "b": (inc, "a")}, ["b"], workers=["plain"], sync=False)
                    assert await got[0] == 2


async def test_bad_graphs_fail_at_submit_naming_the_key() -> None:
    from trioscheduler.client.collections import CycleError, MissingDependencyError

    with trio.fail_after(TIMEOUT):
        async with Scheduler(f"inproc://collections-bad-{os.getpid()}") as s:
            async with Worker(s.address, memory_limit=0), Client(s.address, asynchronous=True) as c:
                from dask._task_spec import Task, TaskRef
                from dask.delayed import Delayed

                missing = {"a": Task("a", inc, TaskRef("missing"))}
                with pytest.raises(MissingDependencyError, match="'a' depends on 'missing'"):
                    c.get(missing, "a")
                cycle = {"a": Task("a", inc, TaskRef("b")), "b": Task("b", inc, TaskRef("a"))}
                with pytest.raises(CycleError, match="cycle in the graph at key 'a'"):
                    c.get(cycle, "a")
                with pytest.raises(CycleError, match="'b' -> 'a'"):
                    c.compute(Delayed("a", cycle))
                assert not s.state.tasks  # nothing was sent


async def test_current_client_then_the_previous_one_and_progress() -> None:
    import io

    from trioscheduler import futures_of, progress

    def body() -> None:
        x = delayed(where)(0, pure=False)
        with Client(processes=False, n_workers=1, threads_per_worker=1) as c1:
            first = set(c1.nthreads())
            assert x.compute() in first
            with Client(processes=False, n_workers=1, threads_per_worker=1) as c2:
                assert x.compute() in set(c2.nthreads())  # the newest client is current
                assert dask.compute(x, scheduler=c1.get)[0] in first
            assert x.compute() in first  # closing c2 restored c1
            from trioscheduler import default_client

            assert default_client() is c1
            y = c1.persist(da.arange(40, chunks=5) + 1)
            assert len(futures_of(y)) == 8
            fs = c1.map(inc, range(20))
            out = io.StringIO()
            progress(y, fs, file=out)  # not a terminal: plain text, every group finished
            text = out.getvalue()
            assert "100%" in text and "inc: 20/20" in text and "add: 8/8" in text
            assert all(f.done() for f in fs)
            with Client(c1.scheduler_address, set_as_default=False) as c3:  # current inside with
                assert default_client() is c3
            assert default_client() is c1
        assert dask.config.get("scheduler", None) is None

    await in_thread(body)


async def test_a_collection_persisted_by_another_client_is_not_recomputed() -> None:
    """Its futures are found in the materialized graph, so their keys count as held."""
    with trio.fail_after(TIMEOUT):
        async with Scheduler(f"inproc://collections-other-{os.getpid()}") as s:
            async with Worker(s.address, nthreads=2, memory_limit=0):
                async with (
                    Client(s.address, asynchronous=True) as a,
                    Client(s.address, asynchronous=True) as b,
                ):
                    name = "persisted-by-a"
                    p = a.persist(delayed(counted)(name, 5))
                    y = a.persist(da.arange(20, chunks=5) * 2)
                    # a's stream and b's are not ordered: wait until a's graphs arrived
                    assert await a.compute([p, y.sum()], sync=True) == [5, 380]
                    assert await b.compute(delayed(inc)(p), sync=True) == 6
                    assert await b.compute(y.sum() + 1, sync=True) == 381
                    assert RUNS[name] == 1
