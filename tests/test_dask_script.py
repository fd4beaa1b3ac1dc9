"""A dask user's script runs with only the import changed: the same script, once with
``distributed`` and once with ``trioscheduler``, prints the same lines.

Futures, ``as_completed``, ``wait``, dask collections, ``Client.current()`` and
``get_executor()`` with ``concurrent.futures.wait``, each in a fresh process.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from user_scripts import run_script

pytest.importorskip("distributed")

SCRIPT = '''
import concurrent.futures as cf

import dask.array as da

{IMPORT}


def inc(x):
    return x + 1


def add(x, y):
    return x + y


def fail(x):
    return x / 0


if __name__ == "__main__":
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            print("current", Client.current() is client)
            fs = client.map(inc, range(10))
            print("total", client.submit(sum, fs).result())
            print("as_completed", sorted(f.result() for f in as_completed(fs)))
            print("pairs", client.gather(client.map(add, [1, 2, 3], [10, 20])))
            done, not_done = wait(fs)
            print("wait", len(done), len(not_done))
            x = da.arange(100, chunks=10)
            print("array", int((x + 1).sum().compute()))
            y = client.persist(x * 2)
            print("persist", int(y.sum().compute()), len(client.who_has(y)))
            ex = client.get_executor()
            cfs = [ex.submit(inc, i) for i in range(5)]
            done, not_done = cf.wait(cfs)
            print("executor", sorted(f.result() for f in done), len(not_done))
            print("executor map", list(ex.map(inc, range(3))))
            try:
                client.submit(fail, 1).result()
            except ZeroDivisionError as exc:
                print("error", type(exc).__name__, exc.__traceback__ is not None)
            print("workers", len(client.scheduler_info()["workers"]))
'''


async def run(tmp_path: Path, name: str, line: str) -> list[str]:
    out = await run_script(tmp_path, name, SCRIPT.replace("{IMPORT}", line))
    return out.splitlines()


@pytest.mark.slow
async def test_a_dask_script_runs_with_only_the_import_changed(tmp_path: Path) -> None:
    names = "Client, LocalCluster, as_completed, wait"
    ours = await run(tmp_path, "ours", f"from trioscheduler import {names}")
    theirs = await run(tmp_path, "theirs", f"from distributed import {names}")
    assert ours == theirs
    assert "executor [1, 2, 3, 4, 5] 0" in ours and "current True" in ours
