"""Published datasets on real clusters; a second client in another process reads them."""

from __future__ import annotations

import os
import sys
import textwrap

import dask.array as da
import numpy as np
import pytest
import trio

from trioscheduler import Client, DatasetExistsError, Future, Scheduler, Worker, futures_of, wait

TIMEOUT = 60

READER = textwrap.dedent(
    """
    import operator
    import sys
    from trioscheduler import Client

    with Client(sys.argv[1], timeout=20) as c:
        print("names", sorted(c.list_datasets()))
        f = c.get_dataset("answer")
        print("answer", f.result(), f.status)
        x = c.get_dataset("array")
        print("array-sum", float(x.sum().compute()))
        print("total", c.submit(operator.add, c.compute(x.sum()), f).result())
        try:
            c.get_dataset("nope")
        except KeyError as exc:
            print("missing", exc)
        print("default", c.get_dataset("nope", default=7))
        c.datasets["from-reader"] = c.submit(sum, [1, 2, 3])
    """
)


def slow_sum(values: list[int]) -> int:
    return sum(values)


async def states(c: Client, keys: list[object]) -> list[object]:
    return [s for _, s in await c.rpc({"op": "task_states", "keys": keys})]


async def test_published_data_outlives_its_client_and_reaches_another_process(
    tmp_path: object,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with Scheduler("tcp://127.0.0.1:0") as s:
            async with (
                Worker(s.address, nthreads=1, memory_limit=0),
                Worker(s.address, nthreads=1, memory_limit=0),
            ):
                async with Client(s.address, asynchronous=True) as c:
                    answer = c.submit(slow_sum, [40, 2])
                    x = c.persist(da.arange(100, chunks=10))
                    await c.publish_dataset(answer=answer, array=x)
                    await wait([answer, *futures_of(x)])
                    keys = [answer.key, *(f.key for f in futures_of(x))]
                # the publisher is gone; its data is still wanted (by the datasets)
                async with Client(s.address, asynchronous=True) as probe:
                    assert set(await states(probe, keys)) == {"memory"}
                result = await trio.run_process(
                    [sys.executable, "-c", READER, s.address],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
                out = result.stdout.decode()
                assert result.returncode == 0, result.stderr.decode()[-3000:]
                assert "names ['answer', 'array']" in out
                assert "answer 42 finished" in out
                assert "array-sum 4950.0" in out
                assert "total 4992" in out
                assert "missing \"dataset 'nope' is not published\"" in out
                assert "default 7" in out
                async with Client(s.address, asynchronous=True) as c:
                    assert await c.get_dataset("from-reader") is not None
                    assert await (await c.get_dataset("from-reader")) == 6
                    await c.unpublish_dataset(["answer", "array", "from-reader"])
                    assert await c.list_datasets() == []
                    with trio.fail_after(10):
                        while set(await states(c, keys)) != {None}:  # noqa: ASYNC110 - scheduler state
                            await trio.sleep(0.01)


async def test_names_override_errors_and_the_mapping() -> None:
    def sync_side(address: str) -> None:
        with Client(address, set_as_default=False) as c:
            f = c.submit(slow_sum, [1, 2])
            c.publish_dataset(f, name="f")
            with pytest.raises(DatasetExistsError, match="'f' is already published.*override=True"):
                c.publish_dataset(f=c.submit(slow_sum, [5]))
            with pytest.raises(KeyError):  # dask's type, for code that catches KeyError
                c.datasets["f"] = 1
            c.publish_dataset(f=c.submit(slow_sum, [5]), override=True)
            assert c.get_dataset("f").result() == 5
            x = c.persist(da.ones(10, chunks=5))
            c.publish_dataset(x)  # positional: named by its dask name
            assert x.name in c.datasets
            y = c.datasets[x.name]
            np.testing.assert_array_equal(c.compute(y).result(), np.ones(10))
            c.datasets["plain"] = {"a": 1}  # anything picklable
            assert dict(c.datasets.items())["plain"] == {"a": 1}
            assert sorted(c.datasets, key=str) == sorted(["f", x.name, "plain"], key=str)
            assert len(c.datasets) == 3
            del c.datasets["plain"]
            with pytest.raises(KeyError, match="'plain' is not published"):
                del c.datasets["plain"]
            with pytest.raises(KeyError, match="'gone' is not published"):
                c.get_dataset("gone")
            assert c.get_dataset("gone", default=None) is None
            with pytest.raises(TypeError, match="name it instead"):
                c.publish_dataset(3)
            c.unpublish_dataset(["f", x.name])

    with trio.fail_after(TIMEOUT):
        for address in (f"inproc://ds-{os.getpid()}", "tcp://127.0.0.1:0"):
            async with Scheduler(address) as s, Worker(s.address, nthreads=2, memory_limit=0):
                if address.startswith("inproc"):
                    async with Client(s.address, asynchronous=True) as c:
                        f = c.submit(slow_sum, [1])
                        await c.publish_dataset(one=f)
                        got = await c.get_dataset("one")
                        assert isinstance(got, Future) and await got == 1
                        with pytest.raises(TypeError, match="asynchronous"):
                            c.datasets["x"] = 1
                        await c.unpublish_dataset("one")
                else:
                    await trio.to_thread.run_sync(sync_side, s.address)
