"""The asynchronous Client against a real Scheduler and Workers, over inproc:// and tcp://.

Workers run in this process (their tasks in threads), so task functions can record what
they did in module globals and tests can block tasks on ``threading.Event``s.
"""

from __future__ import annotations

import gc
import os
import threading
import traceback
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
import trio

from polling import wait_until
from trioscheduler import (
    Client,
    Future,
    FutureCancelledError,
    Scheduler,
    Worker,
    fire_and_forget,
    wire,
)
from trioscheduler.wire.runspec import UnpicklableArgumentError

TIMEOUT = 30
CALLS: Counter[str] = Counter()


@pytest.fixture(params=["inproc", "tcp"])
def address(request: pytest.FixtureRequest) -> str:
    if request.param == "inproc":
        return f"inproc://test-client-{os.getpid()}-{request.node.name}"
    return "tcp://127.0.0.1:0"



@asynccontextmanager
async def cluster(address: str) -> AsyncIterator[tuple[Scheduler, list[Worker], Client]]:
    async with Scheduler(address, validate=True) as s:
        async with (
            Worker(s.address, nthreads=2, name="alice", memory_limit=0) as a,
            Worker(s.address, nthreads=1, name="bob", memory_limit=0, resources={"GPU": 1}) as b,
        ):
            async with Client(s.address, asynchronous=True) as c:
                await c.wait_for_workers(2)
                yield s, [a, b], c


def inc(x: int) -> int:
    return x + 1


def add(*args: int) -> int:
    return sum(args)


def counted(name: str, value: Any = None) -> Any:
    CALLS[name] += 1
    return value


def fail(x: Any) -> None:
    raise ValueError(f"bad value {x!r}")


def flaky(name: str, failures: int) -> str:
    CALLS[name] += 1
    if CALLS[name] <= failures:
        raise RuntimeError(f"attempt {CALLS[name]} fails")
    return "ok"


EVENTS: dict[str, threading.Event] = {}


def gate(name: str) -> threading.Event:
    """A named event that tasks can block on (events themselves do not pickle)."""
    return EVENTS.setdefault(name, threading.Event())


def block(name: str, value: Any = None) -> Any:
    gate(name).wait(TIMEOUT)
    return value


ARRIVED: dict[str, list[int]] = {}


def _arrived(name: str, i: int) -> Marker:
    ARRIVED.setdefault(name, []).append(i)
    return Marker(name, i)


class Marker:
    """A result that notes when it is unpickled (on the client: fetched from a worker)."""

    def __init__(self, name: str, i: int) -> None:
        self.name, self.i = name, i

    def __reduce__(self) -> Any:
        return (_arrived, (self.name, self.i))


def marker(name: str, i: int) -> Marker:
    return Marker(name, i)


# --------------------------------------------------------------------------------------


async def test_submit_result_and_await(address: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster(address) as (s, _, c):
            f = c.submit(inc, 1)
            assert isinstance(f, Future)
            assert f.key.startswith("inc-")
            assert await f == 2
            assert await f.result() == 2
            assert f.status == "finished" and f.done() and not f.cancelled()
            assert "finished" in repr(f) and "int" in repr(f)
            assert await c.submit(add, 1, 2, 3) == 6
            assert await c.submit(add, key="my-key") == 0
            assert "my-key" in s.state.tasks


async def test_map_and_gather(address: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster(address) as (_, _, c):
            fs = c.map(inc, range(50))
            assert len({f.key for f in fs}) == 50
            assert await c.gather(fs) == list(range(1, 51))
            pairs = c.map(add, [1, 2], [10, 20])
            assert await c.gather({"a": pairs[0], "b": [pairs[1], 5]}) == {"a": 11, "b": [22, 5]}
            prefixed = c.map(inc, [1, 2], key="step")
            assert all(f.key.startswith("step-") for f in prefixed)
            named = c.map(inc, [1, 2], key=["one", "two"])
            assert [f.key for f in named] == ["one", "two"]
            assert await c.gather(named) == [2, 3]
            # iterables of different lengths stop at the shortest (builtin map, dask)
            assert await c.gather(c.map(add, [1, 2, 3], [10, 20])) == [11, 22]
            with pytest.raises(ValueError, match="2 keys for 1 tasks"):
                c.map(inc, [1], key=["a", "b"])


async def test_gather_fetches_a_batch_as_soon_as_it_is_done(monkeypatch: Any) -> None:
    """gather fetches ``FETCH_BATCH`` results at a time, each batch once its keys are
    done: the first values reach the client while a later task still runs."""
    from trioscheduler.client import transfer

    monkeypatch.setattr(transfer, "FETCH_BATCH", 3)
    name = f"fetch-{uuid.uuid4().hex}"
    with trio.fail_after(TIMEOUT):
        async with cluster("tcp://127.0.0.1:0") as (_, _, c):  # tcp: values are pickled
            fs = c.map(marker, [name] * 7, range(7))
            last = c.submit(block, name, "last")
            got: list[Any] = []

            async def gather() -> None:
                got.extend(await c.gather([*fs, last]))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(gather)
                await wait_until(lambda: len(ARRIVED.get(name, ())) >= 6)  # two batches
                assert not got
                gate(name).set()
            assert [m.i for m in got[:7]] == list(range(7)) and got[7] == "last"
            assert sorted(ARRIVED[name]) == list(range(7))


async def test_futures_as_arguments_become_dependencies(address: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster(address) as (s, _, c):
            x = c.submit(inc, 1)
            y = c.submit(inc, x)
            z = c.submit(add, x, y, c.submit(inc, 10))  # an anonymous dependency too
            assert await z == 2 + 3 + 11
            total = c.submit(sum, c.map(inc, range(10)))  # futures inside a list
            assert await total == 55
            assert set(s.state.tasks[z.key].dependencies) >= {x.key, y.key}


async def test_pure_calls_are_computed_once(address: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster(address) as (_, _, c):
            name = f"pure-{address}"
            a = c.submit(counted, name, 1)
            b = c.submit(counted, name, 1)
            assert a.key == b.key
            assert await c.gather([a, b]) == [1, 1]
            assert CALLS[name] == 1
            fs = c.map(counted, [name] * 3, [1] * 3)  # one key, packed and run once
            assert len({f.key for f in fs}) == 1
            await c.gather(fs)
            assert CALLS[name] == 2  # map keys differ from submit keys, as in dask
            impure = [c.submit(counted, name + "-impure", pure=False) for _ in range(3)]
            assert len({f.key for f in impure}) == 3
            await c.gather(impure)
            assert CALLS[name + "-impure"] == 3


async def test_task_error_has_original_type_and_remote_traceback(address: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster(address) as (_, _, c):
            f = c.submit(fail, 42)
            with pytest.raises(ValueError, match="bad value 42") as info:
                await f
            # the remote frames are a real traceback: print_tb/pdb/IDEs show them
            frames = [fr.name for fr in traceback.extract_tb(info.value.__traceback__)]
            assert "fail" in frames
            assert f.status == "error" and f.done()
            exc = await f.exception()
            assert isinstance(exc, ValueError)
            assert "fail" in [fr.name for fr in traceback.extract_tb(await f.traceback())]
            dependent = c.submit(inc, f)
            with pytest.raises(ValueError, match="bad value 42"):
                await dependent
            with pytest.raises(ValueError):
                await c.gather([c.submit(inc, 1), f])
            assert await c.gather([c.submit(inc, 1), f], errors="skip") == [2]


async def test_unpicklable_argument_fails_at_submit(address: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster(address) as (_, _, c):
            with pytest.raises(UnpicklableArgumentError, match="positional argument 1"):
                c.submit(add, 1, threading.Lock())
            with pytest.raises(UnpicklableArgumentError, match="keyword argument 'lock'"):
                c.submit(counted, "x", lock=threading.Lock())
            assert await c.submit(inc, 1) == 2  # the client still works


async def test_invalid_placement_arguments_rejected_at_submit(address: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster(address) as (_, _, c):
            with pytest.raises(TypeError, match="workers= takes"):
                c.submit(inc, 1, workers=3.5)
            with pytest.raises(TypeError, match="workers= takes"):
                c.map(inc, [1], workers=[object()])
            with pytest.raises(TypeError, match="resources= takes"):
                c.submit(inc, 1, resources=["GPU"])
            with pytest.raises(TypeError, match="resources= takes"):
                c.submit(inc, 1, resources={"GPU": "one"})
            with pytest.raises(ValueError, match=">= 0"):
                c.submit(inc, 1, resources={"GPU": -1})
            with pytest.raises(ValueError, match="allow_other_workers"):
                c.submit(inc, 1, allow_other_workers=True)
            with pytest.raises(TypeError, match="callable"):
                c.submit(1)  # type: ignore[arg-type]


async def test_workers_and_resources_place_tasks(address: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster(address) as (_, (a, b), c):
            on_b = c.submit(inc, 1, workers="bob")
            on_a = c.submit(inc, 2, workers=[a.address])
            gpu = c.submit(inc, 3, resources={"GPU": 1})
            await c.gather([on_a, on_b, gpu])
            who = await c.who_has([on_a, on_b, gpu])
            assert who[on_b.key] == [b.address]
            assert who[on_a.key] == [a.address]
            assert who[gpu.key] == [b.address]


async def test_cluster_information(address: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster(address) as (s, (a, b), c):
            info = await c.scheduler_info()
            assert info["address"] == s.address
            assert info["workers"][a.address]["name"] == "alice"
            assert info["workers"][b.address]["resources"] == {"GPU": 1}
            assert info["workers"][a.address]["status"] == "running"
            assert await c.nthreads() == {a.address: 2, b.address: 1}
            f = c.submit(inc, 1, workers="alice")
            await f
            has = await c.has_what()
            assert f.key in has[a.address]
            assert await c.who_has(f) == {f.key: [a.address]}
            with pytest.raises(TimeoutError, match="of 5 workers"):
                await c.wait_for_workers(5, timeout=0.2)


async def test_scatter_and_gather(address: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster(address) as (_, (a, b), c):
            one = await c.scatter(41)
            assert one.status == "finished"
            assert await c.submit(inc, one) == 42
            xs = await c.scatter([1, 2, 3])
            assert await c.gather(xs) == [1, 2, 3]
            d = await c.scatter({"x": 10, "y": 20}, workers="bob")
            assert set(d) == {"x", "y"}
            assert (await c.who_has(d["x"]))["x"] == [b.address]
            assert await c.submit(add, d["x"], d["y"]) == 30
            everywhere = await c.scatter([5], broadcast=True)
            assert sorted((await c.who_has(everywhere))[everywhere[0].key]) == sorted(
                [a.address, b.address]
            )
            again = await c.scatter([1, 2, 3])
            assert [f.key for f in again] == [f.key for f in xs]  # hash=True: same keys
            fresh = await c.scatter([1], hash=False)
            assert fresh[0].key != xs[0].key


async def test_cancel(address: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster(address) as (s, _, c):
            gate_name = f"{address}-{uuid.uuid4().hex}"
            ev = gate(gate_name)
            try:
                f = c.submit(block, gate_name, 1, pure=False)
                await c.cancel(f)
                assert f.cancelled() and f.status == "cancelled"
                with pytest.raises(FutureCancelledError):
                    await f
                await wait_until(lambda: f.key not in s.state.tasks)
            finally:
                ev.set()
            assert await c.submit(inc, 1) == 2


async def test_retries_and_retry(address: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster(address) as (_, _, c):
            name = f"flaky-{address}"
            assert await c.submit(flaky, name, 2, retries=2) == "ok"
            assert CALLS[name] == 3
            name2 = name + "-manual"
            f = c.submit(flaky, name2, 1)
            with pytest.raises(RuntimeError, match="attempt 1"):
                await f
            await c.retry(f)
            assert await f == "ok"


async def test_release_frees_the_key_on_the_cluster(address: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster(address) as (s, workers, c):
            f = c.submit(inc, 100)
            key = f.key
            await f
            assert key in s.state.tasks
            g = Future(key, c)  # a second handle keeps it alive
            f.release()
            await trio.sleep(0.05)
            assert key in s.state.tasks
            del g
            gc.collect()
            await wait_until(lambda: key not in s.state.tasks)
            await wait_until(lambda: all(key not in w.state.tasks for w in workers if w.state))


async def test_leaving_the_client_releases_everything(address: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with Scheduler(address) as s, Worker(s.address, nthreads=1, memory_limit=0):
            gate_name = f"{address}-{uuid.uuid4().hex}"
            ev = gate(gate_name)
            try:
                async with Client(s.address, asynchronous=True) as c:
                    done = c.submit(inc, 1)
                    await done
                    blocked = c.submit(block, gate_name, pure=False)
                    queued = c.map(inc, range(10, 20))
                    assert not blocked.done()
                client_id = c.id
                assert client_id not in s.state.clients
                await wait_until(lambda: not s.state.tasks)
                assert c.status == "closed"
                assert blocked.cancelled()
                assert all(f.cancelled() for f in queued)  # queued behind it: never ran
            finally:
                ev.set()


async def test_fire_and_forget(address: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster(address) as (s, _, c):
            name = f"fnf-{address}"
            gate_name = f"{address}-{uuid.uuid4().hex}"
            ev = gate(gate_name)
            blocker = c.submit(block, gate_name, pure=False)
            f = c.submit(counted, name, blocker)
            key = f.key
            fire_and_forget(f)
            del f, blocker
            gc.collect()
            await trio.sleep(0.05)
            assert key in s.state.tasks  # still wanted by fire-and-forget
            ev.set()
            await wait_until(lambda: CALLS[name] == 1)
            await wait_until(lambda: key not in s.state.tasks)


async def test_unreachable_scheduler_times_out_naming_the_address() -> None:
    with trio.fail_after(TIMEOUT):
        # a port that was free a moment ago: nothing listens there
        sock = trio.socket.socket()
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        address = f"tcp://127.0.0.1:{port}"
        with pytest.raises(wire.ConnectError, match=f"127.0.0.1:{port}"):
            async with Client(address, timeout=0.3, asynchronous=True):
                pass  # pragma: no cover


async def test_many_submits_coalesce_into_few_graphs(address: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster(address) as (_, _, c):
            fs = [c.submit(inc, i) for i in range(200)]
            assert await c.gather(fs) == list(range(1, 201))


async def test_scatter_again_after_release_keeps_the_key(address: str) -> None:
    """Scattering data again right after releasing it never loses the new copy, and the
    key stays the value's hash, as in dask: a ``FreeKeys`` of the released copy still on
    its way to the worker names the data update it was sent for, and the worker keeps
    the newer one (the race itself, step by step:
    ``test_a_key_scattered_again_survives_the_free_of_its_released_value``)."""
    with trio.fail_after(TIMEOUT):
        async with cluster(address) as (s, _, c):
            for i in range(6):
                [x] = await c.scatter([f"payload-{address}"])
                assert await c.submit(len, x) == len(f"payload-{address}")
                key = x.key
                del x
                gc.collect()
                [y] = await c.scatter([f"payload-{address}"])
                assert y.key == key
                assert await y == f"payload-{address}", i
                [z] = await c.scatter([f"payload-{address}"])
                assert z.key == y.key
                del y, z
                gc.collect()


@pytest.mark.anyio
async def test_async_client_without_address_starts_and_stops_a_cluster(anyio_backend: str) -> None:
    with anyio.fail_after(TIMEOUT):
        async with Client(asynchronous=True, n_workers=1, processes=False) as c:
            assert c.cluster is not None and c.cluster.status == "running"
            assert await c.submit(inc, 1) == 2
            cluster = c.cluster
        assert cluster.status == "closed"
        with pytest.raises(TypeError, match="unexpected keyword"):
            Client("tcp://127.0.0.1:1", asynchronous=True, n_workers=2)


def worker_pid(dask_worker: Any = None) -> tuple[int, str]:
    return os.getpid(), dask_worker.address if dask_worker is not None else ""


async def test_run_on_every_worker(address: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster(address) as (_, (a, b), c):
            out = await c.run(worker_pid)
            assert out == {a.address: (os.getpid(), a.address), b.address: (os.getpid(), b.address)}
            assert list(await c.run(worker_pid, workers="bob")) == [b.address]
            with pytest.raises(ValueError, match="bad value 3"):
                await c.run(fail, 3)


async def test_tuple_keys_round_trip(address: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster(address) as (_, (a, _b), c):
            x = c.submit(inc, 1, key=("x", 1), workers="alice")
            y = c.submit(inc, x, key=("y", 1))
            assert await y == 3
            assert (await c.who_has(x)) == {("x", 1): [a.address]}
            assert ("x", 1) in (await c.has_what())[a.address]
            [d] = await c.scatter([7])
            z = c.map(add, [d, d], [x, y], key=[("z", 0), ("z", 1)])
            assert await c.gather(z) == [9, 10]


def text(n: int) -> str:
    return "x" * n


async def test_small_results_come_with_their_completion(address: str) -> None:
    """Small builtin results travel with the completion (no fetch); others are fetched;
    both give the same values through result() and gather()."""
    with trio.fail_after(TIMEOUT):
        async with cluster(address) as (_, _, c):
            small, big, listed = c.submit(inc, 1), c.submit(text, 5000), c.submit(list, "ab")
            assert await small == 2
            assert await big == "x" * 5000
            assert await listed == ["a", "b"]
            assert small._state.held == (2,)
            assert big._state.held is None and listed._state.held is None
            assert await c.gather([small, big, listed]) == [2, "x" * 5000, ["a", "b"]]
            await c.retry([small])  # not erred: nothing changes
            assert await small == 2


async def test_a_request_right_after_submit_sees_the_submitted_task(address: str) -> None:
    """A request never overtakes a submit made before it in the same task, also when the
    request is quicker than the stream (a client in the scheduler's own run)."""
    with trio.fail_after(TIMEOUT):
        async with cluster(address) as (s, _, c):
            f = c.submit(block, "request-after-submit")
            assert f.key in await c.who_has()
            gate("request-after-submit").set()
            assert (await f) is None
