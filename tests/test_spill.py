"""Spilling in a real worker process: values pushed to disk while tasks need them come
back intact, and keys released while being written leave no spill file behind."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import trio

from trioscheduler.client.client import Client
from trioscheduler.deploy.cluster import open_cluster
from trioscheduler.server.nanny import Nanny

TIMEOUT = 90
N = 2**20  # float64 elements: 8 MiB per array
COUNT = 56  # 448 MiB through a worker whose target is 360 MiB
# Headroom below the 570 MiB kill line for the worst case: the process (~60 MiB), the
# target, 10% of the limit waiting to be written, inputs unspilled for the two running
# tasks and the spills they push out (2 x 3 x 8 MiB each way), two new arrays.
LIMIT = "600MiB"


def make(i: int) -> Any:
    return np.full(N, float(i))


def mix(a: Any, b: Any, c: Any) -> float:
    """Reads every page of its three inputs, while the other thread makes more arrays."""
    return float(a.sum() + 2 * b.sum() + 3 * c.sum())


def store_state(dask_worker: Any) -> dict[str, Any]:
    store = dask_worker.store
    files = [f for f in os.listdir(store.directory) if f.endswith(".spill")]
    return {
        "spilled": len(store.spilled),
        "memory": len(store.memory),
        "writing": len(store.writing),
        "core_writing": dask_worker.state.writing_bytes,  # reported written: none left
        "files": len(files),
        "directory": store.directory,
    }


def spill_files_under(path: Any) -> list[str]:
    return [name for _, _, names in os.walk(path) for name in names if name.endswith(".spill")]


async def test_values_evicted_while_tasks_need_them_are_intact(tmp_path: Any) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_cluster(
            1, 2, processes=True, memory_limit=LIMIT, local_directory=str(tmp_path)
        ) as cluster:
            async with Client(cluster, asynchronous=True) as c:
                arrays = [c.submit(make, i, pure=False) for i in range(COUNT)]
                picks = [(i, (i + 7) % COUNT, (i + 13) % COUNT) for i in range(COUNT)]
                mixes = [c.submit(mix, *(arrays[j] for j in p), pure=False) for p in picks]
                expected = [N * (a + 2 * b + 3 * c) for a, b, c in picks]
                assert [await f for f in mixes] == expected
                (state,) = (await c.run(store_state)).values()
                assert state["spilled"] >= 5 and state["files"] >= state["spilled"]
                assert state["directory"].startswith(str(tmp_path))
                for i in (0, COUNT // 2, COUNT - 1):  # from disk, from memory: intact either way
                    value = await arrays[i]
                    assert value.shape == (N,) and (value == float(i)).all()

                # released while spilling: every file goes, none is left half-written
                more = [c.submit(make, i, pure=False) for i in range(COUNT, 2 * COUNT)]
                await more[-1]
                for f in [*arrays, *mixes, *more]:
                    f.release()
                while True:  # files are removed by the worker's writer thread
                    (state,) = (await c.run(store_state)).values()
                    if state["spilled"] + state["memory"] + state["writing"] == 0:
                        if state["files"] == 0 and state["core_writing"] == 0:
                            break
                    await trio.sleep(0.05)
                assert spill_files_under(tmp_path) == []
            nanny = cluster.workers["0"]
            assert isinstance(nanny, Nanny) and nanny.restarts == 0
