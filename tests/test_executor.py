"""The worker's task threads (``trioscheduler.server.executor``) on their own, without a cluster."""

from __future__ import annotations

import threading
from typing import Any

import trio

from trioscheduler.server.executor import Done, ThreadExecutor, nbytes_and_type
from trioscheduler.server.task_context import get_task_key, get_worker
from trioscheduler.wire import runspec

TIMEOUT = 30


class FakeWorker:
    pass


def spec(func: Any, *args: Any) -> bytes:
    return runspec.pack(func, args, {})[0]


def whoami(x: int) -> tuple[int, str, Any, bool]:
    return x, threading.current_thread().name, get_task_key(), isinstance(get_worker(), FakeWorker)


_release = threading.Event()


def blocked() -> bool:
    return _release.wait()


_started = threading.Event()


def blocked_here() -> str:
    _started.set()
    _release.wait()
    return threading.current_thread().name


def fail() -> None:
    raise KeyError("boom")


async def collect(ex: ThreadExecutor, n: int) -> dict[Any, Done]:
    got: dict[Any, Done] = {}
    while len(got) < n:
        for done in await ex.wait():
            got[done.key] = done
    return got


async def test_one_thread_runs_a_stream_of_tasks_with_their_context() -> None:
    ex = ThreadExecutor(FakeWorker(), 1)
    with trio.fail_after(TIMEOUT):
        ex.start()
        try:
            names = set()
            for i in range(50):  # one at a time, as the core hands them out with 1 slot
                ex.submit(f"k{i}", spec(whoami, i), {})
                (done,) = (await collect(ex, 1)).values()
                value, name, key, has_worker = done.value
                assert (value, key, has_worker) == (i, f"k{i}", True)
                assert done.nbytes > 0 and done.type_name == "tuple"
                names.add(name)
            assert len(names) == 1  # no thread started per task
        finally:
            ex.close()


async def test_errors_are_packed_and_a_busy_thread_gets_company() -> None:
    ex = ThreadExecutor(FakeWorker(), 1)
    release = _release
    release.clear()
    with trio.fail_after(TIMEOUT):
        ex.start()
        try:
            ex.submit("blocked", spec(blocked), {})  # e.g. a seceded task
            ex.submit("err", spec(fail), {})
            done = (await collect(ex, 1))["err"]  # ran on a second thread meanwhile
            assert done.error is not None and "boom" in done.error[2]
            release.set()
            assert (await collect(ex, 1))["blocked"].value is True
        finally:
            release.set()
            ex.close()


async def test_a_prefetched_job_waits_for_the_busy_thread_unless_its_task_secedes() -> None:
    ex = ThreadExecutor(FakeWorker(), 1)
    _release.clear()
    _started.clear()
    with trio.fail_after(TIMEOUT):
        ex.start()
        try:
            ex.submit("first", spec(blocked_here), {})
            ex.submit("next", spec(whoami, 1), {}, behind=True)
            with trio.move_on_after(0.3):  # no second thread: it waits for the first
                await ex.wait()
                raise AssertionError("the prefetched job ran beside the busy thread")
            _release.set()
            got = await collect(ex, 2)
            assert got["next"].value[1] == got["first"].value  # on the same thread, next
            # a task that secedes leaves its thread: a job waiting behind it gets another
            _release.clear()
            _started.clear()
            ex.submit("seceding", spec(blocked_here), {})
            await trio.to_thread.run_sync(_started.wait)
            ex.submit("after", spec(whoami, 2), {}, behind=True)
            ex.secede("seceding")
            after = (await collect(ex, 1))["after"]
            _release.set()
            seceded = (await collect(ex, 1))["seceding"]
            assert after.value[1] != seceded.value
        finally:
            _release.set()
            ex.close()


async def test_dependencies_come_from_the_data_mapping() -> None:
    ex = ThreadExecutor(FakeWorker(), 2)
    with trio.fail_after(TIMEOUT):
        ex.start()
        try:
            for i in range(10):
                ex.submit(i, spec(sum, [i, i]), {})
            got = await collect(ex, 10)
            assert {k: d.value for k, d in got.items()} == {i: 2 * i for i in range(10)}
        finally:
            ex.close()


def test_sizes_of_small_builtins_skip_the_dispatch() -> None:
    assert nbytes_and_type(1)[1] == "int"
    assert nbytes_and_type(b"x" * 1000)[0] >= 1000
    assert nbytes_and_type([1, 2, 3])[1] == "list"


def test_only_small_immutable_builtins_are_pushed() -> None:
    from trioscheduler.server.executor import PUSH_MAX_BYTES, nbytes_and_type, pushable

    def push(value: object) -> bool:
        return pushable(value, nbytes_and_type(value)[0])

    assert all(push(v) for v in (1, -(1 << 63), 2.5, True, None, "abc", b"abc"))
    assert not push(1 << 63)  # beyond 64 bits: msgpack could not carry it
    assert not push("x" * (PUSH_MAX_BYTES + 1))
    assert not push([1, 2]) and not push((1,)) and not push({"a": 1})
