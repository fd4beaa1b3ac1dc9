"""Busy polling: a loop about to sleep watches for its next event a little first.

Waking a sleeping process costs far more than the event itself on a virtual machine:
a one-byte ping-pong between two processes over a Unix socket took ~36 us a round with
each side sleeping in ``recv`` and ~7 us with each side polling
(``python -m benchmarks.wake_cost``), and a process woken after a longer sleep, on a
vCPU the host had parked, pays more. A lone ``submit(...).result()`` crosses such a
sleep on each side: the worker waits for its next task, the scheduler for the result.
So a loop with nothing to run polls its I/O for up to ``window`` before trio sleeps in
``epoll_wait``; what it finds there, trio's wait then returns at once.

What keeps the spinning from costing more than it saves:

* It runs only while no other thread of the process is likely to want the GIL the
  spinning loop holds between polls: no ``trio.to_thread.run_sync`` on the default
  limiter is in flight, none marked ``thread_at_work`` (an actor's method), and every
  *gate* allows it: the worker's task threads (``ThreadExecutor.idle``: no thread runs
  a task), a sync client's user thread (``LoopRunner``'s gate: unless it sleeps in a
  wait the loop will end).
* It is bounded: at most ``window`` (``TRIOSCHEDULER_BUSY_POLL_US``, 1 ms by default:
  a worker's next task comes a scheduler's turn-around after its last result, 0.2-0.6
  ms here) and at most a quarter of the time to trio's next deadline, per sleep; so a
  timer fires at most that late.
* It backs off: after a poll that found nothing, the next ``1, 2, 4 ... 64`` sleeps
  are not polled (``SpinBudget``); an idle process sleeps as before, and one whose
  events come slower than the window soon stops paying for it.
* Each poll yields the CPU (``sched_yield``) to whatever else is runnable on it.

Only the runs this package owns poll (a nanny's worker process, the CLI's scheduler and
workers, the sync facade's loop thread: ``install``); a user's own ``trio.run`` hosting
a scheduler or worker does not. ``TRIOSCHEDULER_BUSY_POLL_US=0`` turns it off.

What is polled is trio's own epoll descriptor, readable as soon as any registered
wait (a socket, the wake-up of ``run_sync_soon``) is ready: trio has no public name
for it, so ``_trio_epoll`` reads it from the runner and polling is off where it is not
found (another trio, another platform).
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final

import trio

from trioscheduler.wire.stream import logger

__all__ = [
    "BusyPoll", "ENV", "SpinBudget", "add_gate", "current", "install", "thread_at_work",
    "window_from_env",
]  # fmt: skip

ENV: Final = "TRIOSCHEDULER_BUSY_POLL_US"
DEFAULT_WINDOW_US: Final = 1000
MIN_SPIN: Final = 20e-6  # shorter than this, a poll is not worth starting
MAX_SKIP: Final = 64

Gate = Callable[[], object]
"""Truthy when polling is fine as far as its owner is concerned."""


class SpinBudget:
    """Which sleeps to poll before: all of them while polls find events; after a poll
    that found none, skip the next 1, then 2, 4 ... ``MAX_SKIP`` sleeps (the count
    doubles with each miss in a row, and resets on a hit). Pure: no clock, no I/O."""

    __slots__ = ("_misses", "_skip")

    def __init__(self) -> None:
        self._skip = 0
        self._misses = 0

    def should_poll(self) -> bool:
        if self._skip:
            self._skip -= 1
            return False
        return True

    def record(self, hit: bool) -> None:
        if hit:
            self._misses = 0
        else:
            self._skip = min(1 << self._misses, MAX_SKIP)
            self._misses = min(self._misses + 1, MAX_SKIP.bit_length())


def window_from_env() -> float:
    """The poll window in seconds from ``TRIOSCHEDULER_BUSY_POLL_US``; 0 is off."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT_WINDOW_US / 1e6
    try:
        us = float(raw)
    except ValueError:
        raise ValueError(
            f"{ENV}={raw!r}: expected microseconds (a number; 0 turns busy polling off)"
        ) from None
    if us < 0:
        raise ValueError(f"{ENV}={raw!r}: expected microseconds >= 0")
    return us / 1e6


def _trio_epoll() -> Any:
    """The epoll object of this thread's trio run, or ``None`` (not epoll, or trio moved
    it: then nothing polls, and ``test_wire_busy_poll`` fails)."""
    try:
        from trio._core._run import GLOBAL_RUN_CONTEXT  # no public name: module docstring
    except ImportError:
        return None
    runner = getattr(GLOBAL_RUN_CONTEXT, "runner", None)
    epoll = getattr(getattr(runner, "io_manager", None), "_epoll", None)
    return epoll if isinstance(epoll, select.epoll) else None


_local = threading.local()


class BusyPoll(trio.abc.Instrument):
    """The instrument of one trio run; see the module docstring."""

    __slots__ = (
        "_limiter", "_poll", "budget", "clock", "gates", "hits", "misses", "threads", "window",
    )  # fmt: skip

    def __init__(self, window: float, clock: Callable[[], float] = time.perf_counter) -> None:
        self.window = window
        self.clock = clock
        self.gates: list[Gate] = []
        self.budget = SpinBudget()
        self.hits = 0
        self.misses = 0
        self.threads = 0  # awaits on threads that run Python (``thread_at_work``)
        self._poll: Any = None  # select.poll on trio's epoll descriptor
        self._limiter: trio.CapacityLimiter | None = None  # to_thread's default one

    def before_run(self) -> None:
        epoll = _trio_epoll()
        if epoll is None:
            logger.debug("busy polling is off: trio's epoll descriptor was not found")
            return
        self._poll = select.poll()
        self._poll.register(epoll.fileno(), select.POLLIN)
        self._limiter = trio.to_thread.current_default_thread_limiter()
        _local.poller = self

    def after_run(self) -> None:
        if getattr(_local, "poller", None) is self:
            del _local.poller
        self._poll = None

    def before_io_wait(self, timeout: float) -> None:
        poll = self._poll
        spin = min(self.window, timeout / 4)
        if poll is None or spin < MIN_SPIN or self.threads:
            return
        limiter = self._limiter
        if limiter is not None and limiter.borrowed_tokens:
            return  # a thread of trio.to_thread runs
        for gate in self.gates:
            if not gate():
                return
        budget = self.budget
        if not budget.should_poll():
            return
        clock, ready, yield_cpu = self.clock, poll.poll, os.sched_yield
        end = clock() + spin
        while not ready(0):
            if clock() >= end:
                self.misses += 1
                budget.record(False)
                return
            yield_cpu()
        self.hits += 1
        budget.record(True)


def current() -> BusyPoll | None:
    """The busy poller of this thread's trio run, if it has one."""
    return getattr(_local, "poller", None)


def add_gate(gate: Gate) -> Callable[[], None]:
    """Poll this run only while ``gate()`` is true (no-op in a run that does not poll);
    returns what removes the gate."""
    poller = current()
    if poller is None:
        return _nothing
    poller.gates.append(gate)

    def remove() -> None:
        if gate in poller.gates:
            poller.gates.remove(gate)

    return remove


def _nothing() -> None:
    pass


@contextmanager
def thread_at_work() -> Iterator[None]:
    """Around an await on a thread that runs Python outside ``trio.to_thread``'s default
    limiter (an actor's own): the loop does not poll meanwhile."""
    poller = current()
    if poller is None:
        yield
        return
    poller.threads += 1
    try:
        yield
    finally:
        poller.threads -= 1


def install() -> list[trio.abc.Instrument]:
    """The ``instruments=`` for a ``trio.run`` this package owns: a ``BusyPoll`` on
    Linux unless ``TRIOSCHEDULER_BUSY_POLL_US`` is 0."""
    window = window_from_env()
    if window <= 0 or sys.platform != "linux":
        return []
    return [BusyPoll(window)]
