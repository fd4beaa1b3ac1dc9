"""Busy polling before a loop sleeps (wire/busy_poll.py): when it polls, what it finds,
what stops it, and that the runs this package owns (worker processes, the sync
facade's loop thread) have it while ``TRIOSCHEDULER_BUSY_POLL_US=0`` turns it off."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from trioscheduler import Client, LocalCluster
from trioscheduler.deploy.loop import LoopRunner, loop_runner
from trioscheduler.wire import busy_poll
from trioscheduler.wire.busy_poll import ENV, MAX_SKIP, BusyPoll, SpinBudget

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="polls trio's epoll")


def test_the_budget_skips_twice_as_many_sleeps_after_each_poll_that_found_nothing() -> None:
    budget = SpinBudget()
    polled = []
    for found in [False] * 9 + [True, False]:
        skipped = 0
        while not budget.should_poll():
            skipped += 1
        polled.append(skipped)
        budget.record(found)
    # before each poll: how many sleeps were not polled
    assert polled == [0, 1, 2, 4, 8, 16, 32, MAX_SKIP, MAX_SKIP, MAX_SKIP, 0]
    assert [budget.should_poll() for _ in range(2)] == [False, True]  # one miss: skip one


@given(st.lists(st.booleans(), max_size=60))
def test_the_budget_never_skips_more_than_max_skip_and_polls_at_once_after_a_hit(
    outcomes: list[bool],
) -> None:
    budget = SpinBudget()
    for found in outcomes:
        skipped = 0
        while not budget.should_poll():
            skipped += 1
            assert skipped <= MAX_SKIP
        budget.record(found)
    if outcomes and outcomes[-1]:
        assert budget.should_poll()


def test_the_window_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert busy_poll.window_from_env() == pytest.approx(busy_poll.DEFAULT_WINDOW_US / 1e6)
    monkeypatch.setenv(ENV, "300")
    assert busy_poll.window_from_env() == pytest.approx(300e-6)
    [poller] = busy_poll.install()
    assert isinstance(poller, BusyPoll) and poller.window == pytest.approx(300e-6)
    monkeypatch.setenv(ENV, "0")
    assert busy_poll.install() == []
    for bad in ("fast", "-5"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ValueError, match=f"TRIOSCHEDULER_BUSY_POLL_US={bad!r}"):
            busy_poll.install()


@pytest.fixture
def echo_child() -> Iterator[socket.socket]:
    """A forked process that answers each byte at once (it sleeps in ``recv``: no GIL
    of ours is in its way)."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        ours.close()
        while theirs.recv(1):
            theirs.send(b"!")
        os._exit(0)
    theirs.close()
    yield ours
    ours.close()
    os.waitpid(pid, 0)


async def _ask(sock: socket.socket) -> None:
    sock.send(b"?")
    await trio.lowlevel.wait_readable(sock)
    assert sock.recv(1) == b"!"


def test_a_reply_that_comes_while_the_loop_polls_is_found_by_the_poll(
    echo_child: socket.socket,
) -> None:
    poller = BusyPoll(window=0.05)  # long enough for any scheduling hiccup

    async def main() -> None:
        assert busy_poll.current() is poller  # trio's epoll was found (a trio upgrade?)
        echo_child.setblocking(False)
        for _ in range(20):
            await _ask(echo_child)

    trio.run(main, instruments=[poller])
    assert poller.hits >= 15 and poller.misses <= 5
    assert busy_poll.current() is None  # forgotten with its run


def test_a_closed_gate_stops_the_polling_and_opening_it_again_resumes_it(
    echo_child: socket.socket,
) -> None:
    poller = BusyPoll(window=0.05)
    gate_open = False

    async def main() -> None:
        remove = busy_poll.add_gate(lambda: gate_open)
        echo_child.setblocking(False)
        for _ in range(10):
            await _ask(echo_child)
        assert poller.hits == poller.misses == 0
        nonlocal gate_open
        gate_open = True
        for _ in range(10):
            await _ask(echo_child)
        assert poller.hits >= 5
        remove()
        assert poller.gates == []

    trio.run(main, instruments=[poller])


def test_no_poll_when_a_deadline_is_near_and_timers_still_fire() -> None:
    poller = BusyPoll(window=0.05)

    async def main() -> None:
        for _ in range(5):
            await trio.sleep(0.00001)  # a quarter of the wait is below MIN_SPIN
        with trio.move_on_after(0.02):
            await trio.sleep_forever()  # polled for 5 ms, found nothing, slept

    trio.run(main, instruments=[poller])
    assert poller.hits == 0 and poller.misses == 1


def test_no_poll_while_a_thread_runs_python_for_the_loop() -> None:
    """A thread of ``trio.to_thread`` (default limiter) or one marked ``thread_at_work``
    would wait for the GIL the polling loop holds: the loop sleeps instead."""
    poller = BusyPoll(window=0.05)
    own = trio.CapacityLimiter(1)

    async def main() -> None:
        await trio.to_thread.run_sync(time.sleep, 0.03)  # default limiter
        with busy_poll.thread_at_work():
            await trio.to_thread.run_sync(time.sleep, 0.03, limiter=own)
        assert poller.threads == 0
        assert (poller.hits, poller.misses) == (0, 0)
        with trio.move_on_after(0.03):  # no thread: polled, found nothing
            await trio.sleep_forever()
        assert poller.misses == 1

    trio.run(main, instruments=[poller])


def test_a_run_this_package_does_not_own_has_no_poller_and_gates_are_no_ops() -> None:
    async def main() -> None:
        assert busy_poll.current() is None
        busy_poll.add_gate(lambda: True)()  # nothing to add to, nothing to remove

    trio.run(main)


def test_the_loop_thread_polls_only_while_a_user_thread_sleeps_in_a_call(
    echo_child: socket.socket,
) -> None:
    runner = LoopRunner("test-busy-poll")
    poller = runner.run_sync(busy_poll.current)
    assert isinstance(poller, BusyPoll)
    echo_child.setblocking(False)

    async def ask_many() -> None:
        for _ in range(20):
            await _ask(echo_child)

    runner.run(ask_many)  # this thread sleeps in run(): the loop polls
    assert poller.hits >= 15
    assert runner.sleepers == set()
    hits, misses = poller.hits, poller.misses
    done = threading.Event()
    runner.start_soon(_ask_then_set, echo_child, done)  # nobody sleeps for it
    assert done.wait(10)
    assert (poller.hits, poller.misses) == (hits, misses)


async def _ask_then_set(sock: socket.socket, done: threading.Event) -> None:
    for _ in range(5):
        await _ask(sock)
    done.set()


def _poller_counts() -> tuple[int, int] | None:
    poller = busy_poll.current()
    return None if poller is None else (poller.hits, poller.misses)


def _inc(x: int) -> int:
    return x + 1


@pytest.mark.parametrize("window_us", ["0", "50000"])  # 50 ms: never too short, even loaded
def test_worker_processes_and_the_client_loop_poll_unless_turned_off(
    monkeypatch: pytest.MonkeyPatch, window_us: str
) -> None:
    monkeypatch.setenv(ENV, window_us)  # read by the worker processes as they start
    kw = {"n_workers": 1, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    with LocalCluster(**kw) as cluster, Client(cluster) as client:
        loop_poller = loop_runner().run_sync(busy_poll.current)
        before = loop_poller.hits if loop_poller else 0
        assert [client.submit(_inc, i, pure=False).result() for i in range(30)] == list(
            range(1, 31)
        )
        [counts] = client.run(_poller_counts).values()
        if window_us == "0":
            assert counts is None
        else:
            assert counts is not None and counts[0] >= 10  # waited for the next task polling
        if loop_poller is not None:  # this process's loop started before the setting
            assert loop_poller.hits > before  # results were found polling (1 ms window)
        assert loop_runner().sleepers == set()
