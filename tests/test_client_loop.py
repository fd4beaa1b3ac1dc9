"""The background loop thread used by the sync Client and LocalCluster (``_loop.py``)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio

from trioscheduler.deploy.loop import LoopError, LoopRunner, loop_runner

TIMEOUT = 20


async def in_thread(fn: Callable[[], None]) -> None:
    """Run a blocking check from a plain thread, bounded by fail_after."""
    with trio.fail_after(TIMEOUT):
        await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


async def add(a: int, b: int) -> int:
    await trio.lowlevel.checkpoint()
    return a + b


async def boom() -> None:
    raise ValueError("boom")


def _run_returns_and_raises() -> None:
    runner = loop_runner()
    assert runner is loop_runner()
    assert runner.run(add, 1, 2) == 3
    with pytest.raises(ValueError, match="boom"):
        runner.run(boom)


def _enter_keeps_context_open_until_close() -> None:
    runner = loop_runner()
    log: list[str] = []

    @asynccontextmanager
    async def resource() -> AsyncIterator[str]:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            log.append("enter")
            yield "value"
            log.append("exit")
            nursery.cancel_scope.cancel()

    handle = runner.enter(resource())
    assert handle.value == "value"
    assert log == ["enter"]
    handle.close()
    assert log == ["enter", "exit"]
    handle.close()  # idempotent


def _enter_error_is_raised_in_caller_and_loop_survives() -> None:
    runner = loop_runner()

    @asynccontextmanager
    async def broken() -> AsyncIterator[None]:
        raise OSError("cannot start")
        yield  # pragma: no cover

    with pytest.raises(OSError, match="cannot start"):
        runner.enter(broken())
    assert runner.run(add, 2, 2) == 4


def _failure_while_held_is_reraised_by_close() -> None:
    runner = loop_runner()

    @asynccontextmanager
    async def crashes() -> AsyncIterator[None]:
        async with trio.open_nursery() as nursery:

            async def crash() -> None:
                await trio.lowlevel.checkpoint()
                raise KeyError("crashed")

            nursery.start_soon(crash)
            yield

    handle = runner.enter(crashes())
    with pytest.raises(BaseException) as info:
        handle.close()
    assert "crashed" in repr(info.value) or info.group_contains(KeyError)  # type: ignore[attr-defined]
    assert runner.run(add, 1, 1) == 2


def _start_soon_from_other_thread() -> None:
    runner = loop_runner()
    done = threading.Event()

    async def set_it() -> None:
        done.set()

    runner.start_soon(set_it)
    assert done.wait(10)


def _blocking_call_from_loop_thread_raises() -> None:
    runner = loop_runner()

    async def nested() -> None:
        runner.run(add, 1, 1)

    with pytest.raises(LoopError, match="inside that loop's own thread"):
        runner.run(nested)


async def test_blocking_call_from_trio_task_raises() -> None:
    with pytest.raises(LoopError, match="inside a trio task"):
        loop_runner().run(add, 1, 1)


def _stop_closes_open_handles() -> None:
    runner = LoopRunner(name="test-loop")
    closed: list[bool] = []

    @asynccontextmanager
    async def resource() -> AsyncIterator[None]:
        try:
            yield
        finally:
            closed.append(True)

    runner.enter(resource())
    runner.stop(timeout=5)
    assert closed == [True]
    assert not runner.alive
    with pytest.raises(LoopError, match="shut down"):
        runner.run(add, 1, 1)


# Each blocking check runs in a thread: a trio task may not block on the loop (see above).


async def test_run_returns_and_raises() -> None:
    await in_thread(_run_returns_and_raises)


async def test_enter_keeps_context_open_until_close() -> None:
    await in_thread(_enter_keeps_context_open_until_close)


async def test_enter_error_is_raised_in_caller_and_loop_survives() -> None:
    await in_thread(_enter_error_is_raised_in_caller_and_loop_survives)


async def test_failure_while_held_is_reraised_by_close() -> None:
    await in_thread(_failure_while_held_is_reraised_by_close)


async def test_start_soon_from_other_thread() -> None:
    await in_thread(_start_soon_from_other_thread)


async def test_blocking_call_from_loop_thread_raises() -> None:
    await in_thread(_blocking_call_from_loop_thread_raises)


async def test_stop_closes_open_handles() -> None:
    await in_thread(_stop_closes_open_handles)
