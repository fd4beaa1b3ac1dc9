"""Quick tasks run on the worker's loop thread (``server.quick_tasks``): which ones, and
that a task needing a thread, failing or blocking there still ends as it would in one."""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio

from trioscheduler import Client, Scheduler, Worker, worker_client
from trioscheduler.server.quick_tasks import (
    ENV,
    SPEC_BYTES,
    STREAK,
    QuickTasks,
    kind_of,
    loop_only_error,
)
from trioscheduler.server.task_context import RunInThread

TIMEOUT = 60
RUNS: list[tuple[str, int, int]] = []  # (function, argument, thread ident) of every run


@asynccontextmanager
async def cluster() -> AsyncIterator[Client]:
    """A scheduler, one single-threaded worker in this trio run and an async client."""
    async with AsyncExitStack() as stack:
        s = await stack.enter_async_context(Scheduler(f"inproc://quick-{os.getpid()}"))
        await stack.enter_async_context(Worker(s.address, nthreads=1, memory_limit=0))
        c = await stack.enter_async_context(Client(s.address, asynchronous=True))
        await c.wait_for_workers(1)
        yield c


def where(i: int) -> int:
    RUNS.append(("where", i, threading.get_ident()))
    return i + 1


def needs_a_thread(i: int) -> int:
    RUNS.append(("needs_a_thread", i, threading.get_ident()))
    if i % 10 == 9:
        with worker_client() as client:
            return int(client.submit(where, i, pure=False).result())
    return i + 1


def fails_at(i: int, bad: int) -> int:
    RUNS.append(("fails_at", i, threading.get_ident()))
    if i == bad:
        raise ValueError(f"bad argument {i}")
    return i + 1


def slow_at(i: int, slow: int) -> int:
    RUNS.append(("slow_at", i, threading.get_ident()))
    if i == slow:
        time.sleep(0.02)
    return i + 1


def large_at(i: int, large: int) -> Any:
    RUNS.append(("large_at", i, threading.get_ident()))
    return b"x" * 100_000 if i == large else i + 1


def runs(name: str, i: int) -> list[int]:
    """The threads that ran ``name(i)``, in order."""
    return [ident for fn, arg, ident in RUNS if fn == name and arg == i]


async def on_loop_from(c: Client, fn: Any, *args: Any) -> int:
    """Submit ``fn(i, *args)`` one at a time until one runs on the loop; that ``i``."""
    loop = threading.get_ident()
    for i in range(200):  # (a loaded machine may stretch a thread run past QUICK_SECONDS)
        assert await c.submit(fn, i, *args, pure=False).result() == i + 1
        if runs(fn.__name__, i) == [loop]:
            return i
    raise AssertionError(f"{fn.__name__} never ran on the worker's loop")


def test_kind_is_the_name_part_of_a_key() -> None:
    assert kind_of("inc-1f2e3d") == "inc"
    assert kind_of(("x-5a6b", 0, 1)) == "x"
    assert kind_of("plain") == "plain"
    assert kind_of(7) is None and kind_of(()) is None


def test_a_kind_earns_the_loop_by_a_streak_and_loses_it_by_misbehaving() -> None:
    q = QuickTasks(enabled=True)
    spec = b"s" * 100
    assert not q.on_loop("inc-1", spec)
    for _ in range(STREAK):
        q.note("inc", 1e-5, True)
    assert q.on_loop("inc-1", spec)
    assert not q.on_loop("inc-1", b"s" * (SPEC_BYTES + 1))  # large specs: a thread
    assert not q.on_loop("inc-1", bytearray(spec))  # (out-of-band or not bytes: a thread)
    q.note("inc", 0.5, True, on_loop=True)  # slow on the loop: twice the streak needed
    for _ in range(2 * STREAK - 1):
        q.note("inc", 1e-5, True)
    assert not q.on_loop("inc-1", spec)
    q.note("inc", 1e-5, True)
    assert q.on_loop("inc-1", spec)
    q.note("inc", 1e-5, False, on_loop=True)  # raised on the loop: threads for good
    for _ in range(100):
        q.note("inc", 1e-5, True)
    assert not q.on_loop("inc-1", spec)
    assert q.watch("inc-1") is None and q.watch("dec-1") == "dec"


def test_the_environment_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "0")
    q = QuickTasks()
    for _ in range(STREAK):
        q.note("inc", 1e-5, True)
    assert not q.enabled and not q.on_loop("inc-1", b"s")


async def test_a_lone_quick_task_runs_on_the_loop_and_a_busy_worker_uses_its_thread() -> None:
    RUNS.clear()
    with trio.fail_after(TIMEOUT):
        async with cluster() as c:
            await on_loop_from(c, where)
            futures = c.map(where, range(1000, 1050), pure=False)
            assert await c.gather(futures) == list(range(1001, 1051))
            loop = threading.get_ident()
            assert any(runs("where", i) != [loop] for i in range(1000, 1050))


async def test_a_task_that_needs_a_thread_gets_one_after_its_start_on_the_loop() -> None:
    RUNS.clear()
    loop = threading.get_ident()
    with trio.fail_after(TIMEOUT):
        async with cluster() as c:
            # every tenth call opens a worker_client (secede, a client): on the loop it
            # is started again in a thread, and the kind stays in threads from then on
            for i in range(60):
                assert await c.submit(needs_a_thread, i, pure=False).result() == i + 1
            restarted = [i for i in range(60) if len(runs("needs_a_thread", i)) == 2]
            assert all(i % 10 == 9 for i in restarted)
            for i in restarted:
                first, second = runs("needs_a_thread", i)
                assert first == loop and second != loop
            if restarted:  # (a loaded machine may keep every run in a thread)
                assert all(runs("needs_a_thread", i) != [loop] for i in range(restarted[0] + 1, 60))


async def test_an_error_on_the_loop_is_the_tasks_own_and_it_runs_once() -> None:
    """A task that raises on the loop is not run again (its side effects happen once, as
    in dask), and its error reaches the user with the task's own frame."""
    RUNS.clear()
    loop = threading.get_ident()
    with trio.fail_after(TIMEOUT):
        async with cluster() as c:
            i = await on_loop_from(c, fails_at, -1)
            bad = i + 1
            future = c.submit(fails_at, bad, bad, pure=False)
            with pytest.raises(ValueError, match=f"bad argument {bad}"):
                await future.result()
            assert runs("fails_at", bad) == [loop]
            tb = "".join(traceback.format_tb(await future.traceback()))
            assert "fails_at" in tb and 'raise ValueError(f"bad argument {i}")' in tb
            assert await c.submit(fails_at, bad + 1, bad, pure=False).result() == bad + 2


def test_only_errors_of_the_loop_itself_send_a_task_to_a_thread() -> None:
    assert loop_only_error(RunInThread("secede() needs a task thread"))
    for call in (lambda: trio.from_thread.run_sync(int), lambda: trio.run(trio.sleep, 0)):

        async def on_a_trio_thread(call: Any = call) -> BaseException:
            try:
                call()
            except RuntimeError as exc:
                return exc
            raise AssertionError("no error")

        assert loop_only_error(trio.run(on_a_trio_thread))
    assert not loop_only_error(RuntimeError("a task's own"))
    assert not loop_only_error(ValueError("wasn't created by Trio"))
    assert not loop_only_error(None)


async def test_a_kind_slow_on_the_loop_goes_back_to_the_threads() -> None:
    RUNS.clear()
    loop = threading.get_ident()
    with trio.fail_after(TIMEOUT):
        async with cluster() as c:
            i = await on_loop_from(c, slow_at, -1)
            slow = i + 1
            assert await c.submit(slow_at, slow, slow, pure=False).result() == slow + 1
            assert runs("slow_at", slow) == [loop]  # (run once: a slow task is no error)
            for j in range(slow + 1, slow + 1 + 2 * STREAK):
                assert await c.submit(slow_at, j, slow, pure=False).result() == j + 1
                assert runs("slow_at", j) != [loop]


async def test_a_kind_that_returned_a_large_result_on_the_loop_stays_in_threads() -> None:
    RUNS.clear()
    loop = threading.get_ident()
    with trio.fail_after(TIMEOUT):
        async with cluster() as c:
            i = await on_loop_from(c, large_at, -1)
            large = i + 1
            assert await c.submit(large_at, large, large, pure=False).result() == b"x" * 100_000
            assert runs("large_at", large) == [loop]
            for j in range(large + 1, large + 20):
                assert await c.submit(large_at, j, large, pure=False).result() == j + 1
                assert runs("large_at", j) != [loop]
