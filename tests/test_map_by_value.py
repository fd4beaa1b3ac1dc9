"""A user's script whose functions cloudpickle ships by value (defined in ``__main__``,
lambdas, closures): ``map`` sends such a function once per message and each call's
plain arguments beside it (``runspec.shared_packer``); ``submit`` and dask collections
go their own ways. All of them run right on worker processes, and a task's error
reaches the user with its traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from user_scripts import run_script

SCRIPT = '''
import traceback

import dask

from trioscheduler import Client, LocalCluster

OFFSET = 100


def inc(x, step=1):
    return x + step


def shout(s):
    return s.upper() + "!"


def fail(x):
    if x == 3:
        raise ZeroDivisionError(f"no {x}")
    return x


def make_adder(n):
    def add_n(x):
        return x + n
    return add_n


if __name__ == "__main__":
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            print("main", client.gather(client.map(inc, range(5))))
            print("kwargs", client.gather(client.map(inc, range(5), step=10, batch_size=2)))
            print("strings", client.gather(client.map(shout, ["a", "b"])))
            print("mixed", client.gather(client.map(inc, [1, 2.5, True, -1])))
            print("lambda", client.gather(client.map(lambda x: x * OFFSET, range(3))))
            print("closure", client.gather(client.map(make_adder(7), range(3))))
            fs = client.map(inc, range(3))
            print("futures", client.gather(client.map(inc, fs)))
            print("submit", client.submit(inc, 41).result(), client.submit(lambda: 5).result())
            d = dask.delayed(inc)(dask.delayed(make_adder(2))(1))
            print("delayed", d.compute())
            errs = client.map(fail, range(5))
            try:
                client.gather(errs)
            except ZeroDivisionError as exc:
                names = [f.name for f in traceback.extract_tb(exc.__traceback__)]
                print("error", exc, "fail" in names)
            print("others", [f.result() for i, f in enumerate(errs) if i != 3])
'''


@pytest.mark.slow
async def test_by_value_functions_run_through_map_submit_and_collections(tmp_path: Path) -> None:
    out = await run_script(tmp_path, "user_script", SCRIPT)
    assert out.splitlines() == [
        "main [1, 2, 3, 4, 5]",
        "kwargs [10, 11, 12, 13, 14]",
        "strings ['A!', 'B!']",
        "mixed [2, 3.5, 2, 0]",
        "lambda [0, 100, 200]",
        "closure [7, 8, 9]",
        "futures [2, 3, 4]",
        "submit 42 5",
        "delayed 4",
        "error no 3 True",
        "others [0, 1, 2, 4]",
    ]
