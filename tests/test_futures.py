"""Futures with an asynchronous client: waiting, as_completed, handles and lost keys."""

from __future__ import annotations

import gc
import os
import pickle
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from polling import wait_until
from trioscheduler import (
    Client,
    Future,
    FutureCancelledError,
    Scheduler,
    Worker,
    as_completed,
    wait,
)
from trioscheduler.client.client import ClientClosedError
from trioscheduler.client.futures import futures_of

TIMEOUT = 30
GATES: dict[str, threading.Event] = {}


def gate(name: str) -> threading.Event:
    return GATES.setdefault(name, threading.Event())


def block(name: str, value: Any = None) -> Any:
    gate(name).wait(TIMEOUT)
    return value


def inc(x: int) -> int:
    return x + 1


def fail(x: Any) -> None:
    raise ZeroDivisionError(x)



@asynccontextmanager
async def cluster(name: str, n: int = 1) -> AsyncIterator[tuple[Scheduler, list[Worker], Client]]:
    async with Scheduler(f"inproc://futures-{os.getpid()}-{name}") as s:
        workers = [Worker(s.address, nthreads=2, memory_limit=0) for _ in range(n)]
        async with workers[0], workers[1] if n > 1 else _nothing():
            async with Client(s.address, asynchronous=True) as c:
                await c.wait_for_workers(n)
                yield s, workers, c


@asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield None


async def test_wait_all_and_first_completed() -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster("wait") as (_, _, c):
            fs = c.map(inc, range(5))
            done, not_done = await wait(fs)
            assert done == set(fs) and not not_done
            g = "futures-first"
            slow = c.submit(block, g, 1)
            quick = c.submit(inc, 1)
            done, not_done = await wait([slow, quick], return_when="FIRST_COMPLETED")
            assert quick in done and slow in not_done
            with pytest.raises(TimeoutError, match="1 of 1"):
                await wait([slow], timeout=0.02)
            gate(g).set()
            assert await slow == 1
            with pytest.raises(TypeError, match="one list"):
                wait(fs[0], fs[1])  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="return_when"):
                wait(fs, return_when="SOMETIMES")


async def test_as_completed_async_with_add_and_results() -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster("ac") as (_, _, c):
            ac = as_completed(c.map(inc, range(3)))
            seen = []
            async for f in ac:
                seen.append(await f)
                if len(seen) == 1:
                    ac.add(c.submit(inc, 10))
            assert sorted(seen) == [1, 2, 3, 11]
            pairs = [p async for p in as_completed(c.map(inc, [5, 6]), with_results=True)]
            assert sorted(r for _, r in pairs) == [6, 7]
            with pytest.raises(ZeroDivisionError):
                async for _ in as_completed([c.submit(fail, 1)], with_results=True):
                    pass
            ac = as_completed([c.submit(inc, 1)])
            assert ac.count() == 1
            await wait_until(ac.has_ready)
            assert ac.next_batch(block=False) and ac.is_empty()


async def test_manual_future_handles_and_futures_of() -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster("handles") as (s, _, c):
            f = c.submit(inc, 1)
            await f
            again = Future(f.key, c)
            assert again.status == "finished" and await again == 2
            assert futures_of([f, {"x": (again, 3)}, "text"]) == [f, again]
            with pytest.raises(TypeError, match="cannot be pickled"):
                pickle.dumps(f)
            # a Future for a key another client computed
            async with Client(s.address, asynchronous=True) as other:
                shared = Future(f.key, other)
                assert await shared == 2
            with pytest.raises(TypeError, match="a key must be"):
                Future(object(), c)


async def test_release_from_another_thread() -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster("threads") as (s, _, c):
            f = c.submit(inc, 7)
            key = f.key
            await f
            holder = [f]
            del f
            await trio.to_thread.run_sync(holder.clear)  # the last reference dies in a thread
            gc.collect()
            await wait_until(lambda: key not in s.state.tasks)


async def test_lost_key_is_recomputed() -> None:
    """The only holder leaves: the future goes back to pending, then finishes again."""
    with trio.fail_after(TIMEOUT):
        async with Scheduler(f"inproc://futures-{os.getpid()}-lost") as s:
            async with Worker(s.address, nthreads=1, memory_limit=0, name="stays") as stays:
                async with Client(s.address, asynchronous=True) as c:
                    async with Worker(s.address, nthreads=1, memory_limit=0, name="goes"):
                        await c.wait_for_workers(2)
                        f = c.submit(inc, 41, workers="goes", allow_other_workers=True)
                        assert await f == 42
                        assert await c.who_has(f) != {f.key: [stays.address]}
                    # "goes" left with the only copy
                    assert await f == 42
                    assert (await c.who_has(f))[f.key] == [stays.address]


async def test_as_completed_clear_and_timeout() -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster("ac-clear") as (_, _, c):
            g = "futures-ac-timeout"
            ac = as_completed([c.submit(block, g, 1)], timeout=0.05)
            with pytest.raises(TimeoutError, match="nothing completed"):
                await ac.__anext__()
            ac.clear()
            assert ac.is_empty()
            gate(g).set()
            await trio.sleep(0.05)
            assert ac.is_empty() and not ac.has_ready()  # the cleared future is not yielded


async def test_losing_the_scheduler_cancels_pending_futures() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            ready: list[Scheduler] = []
            stop = trio.Event()

            async def serve(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                async with Scheduler("tcp://127.0.0.1:0") as s:
                    ready.append(s)
                    task_status.started()
                    await stop.wait()

            await nursery.start(serve)
            async with Client(ready[0].address, asynchronous=True) as c:
                f = c.submit(inc, 1)  # no worker: stays pending
                stop.set()  # the scheduler goes away
                with pytest.raises(FutureCancelledError, match="lost the connection"):
                    await f
                assert c.status == "closed"
                with pytest.raises(ClientClosedError):
                    c.submit(inc, 2)


async def test_user_errors_survive_an_outside_cancellation() -> None:
    """Closing is cancelled from outside while the body fails: the body's error wins."""
    with trio.fail_after(TIMEOUT):
        with pytest.raises(BaseExceptionGroup) as info:
            async with trio.open_nursery() as nursery:
                async with Scheduler(f"inproc://futures-{os.getpid()}-cancel") as s:
                    async with Client(s.address, asynchronous=True):
                        nursery.cancel_scope.cancel()
                        raise KeyError("the user's own error")
        assert info.group_contains(KeyError, match="own error")


def test_a_waiter_added_from_another_thread_is_never_lost() -> None:
    """``result()`` of a sync client arms its wake-up from the user's thread while the
    loop thread may be settling the key: either ``add_waiter`` says done, or the
    wake-up runs (else ``result()`` would sleep until its poll, or forever)."""
    from trioscheduler.client.futures import KeyState

    for i in range(500):
        st = KeyState(("k", i))
        woken = threading.Event()
        said_done: list[bool] = []
        start = threading.Barrier(2)

        def arm(
            st: KeyState = st,
            woken: threading.Event = woken,
            out: list[bool] = said_done,
            start: threading.Barrier = start,
        ) -> None:
            start.wait()
            out.append(st.add_waiter(woken.set))

        t = threading.Thread(target=arm)
        t.start()
        start.wait()
        st.finish("int")
        t.join()
        assert said_done == [True] or woken.is_set(), i
    st = KeyState("done")
    st.finish()
    assert st.add_waiter(lambda: None) is True and st.hooks == []
