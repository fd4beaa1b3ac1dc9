"""Which tasks a worker may run on its loop thread instead of handing them to a thread.

A lone task's trip to a task thread and back is two wake-ups (the loop wakes the
thread through a pipe; the thread wakes the loop through ``run_sync_soon``) and the GIL
handed over twice: ~90 us of a ~500 us ``submit(...).result()`` on a 2-core machine
(``benchmarks.round_trip_hops``). A task that takes microseconds is cheaper to run
where it is, on the loop, but a slow one run there stalls everything the loop does
(the scheduler's messages, peers' fetches, heartbeats) for as long as it runs.

So a task runs on the loop only when all of these hold:

* every task thread is idle and nothing waits for one (the lone task of a
  ``submit(...).result()``; a busy worker keeps its threads, so a ``map`` is unchanged);
* it has no dependencies (reading one could read a spilled value from disk) and its run
  spec is small bytes (``SPEC_BYTES``: no large argument unpickled on the loop);
* its *kind* (the key's name part, ``inc`` of ``inc-<token>``, as dask's
  ``key_split`` but cheaper) finished its last ``STREAK`` runs without an error, each
  within ``QUICK_SECONDS`` and with a result of at most ``RESULT_BYTES`` (a large one
  is copied into shared memory as it returns, ``same_host``: not on the loop), runs
  measured in a thread while all others were idle;
* the kind never needed a thread nor returned a large result on the loop (either
  sends it to the threads for good; the large result is placed there this once); a run
  on the loop that took longer than ``QUICK_SECONDS`` (a task that blocked, or a loop
  the machine preempted) sends the kind back to the threads until it shows twice as
  long a streak as it needed before: a kind that is slow now and then runs on the loop
  ever more rarely, and a busy machine's noise costs a few runs in threads.

A task that fails on the loop only because it runs there (``loop_only_error``: it
called ``secede()``, ``get_client()`` or ``worker_client()``, which raise
``RunInThread`` there, or a trio ``from_thread`` function, or ``trio.run``) runs again
from the start in a thread, and its outcome there is the task's. Any other error is
the task's own and ends it, as in a thread: it is not run twice, so the side effects
of a task that raises happen once, as in dask. ``TRIOSCHEDULER_QUICK_TASKS_ON_LOOP=0``
in a worker's environment turns all of this off.
"""

from __future__ import annotations

import os
from typing import Any

from trioscheduler.server.task_context import RunInThread

ENV = "TRIOSCHEDULER_QUICK_TASKS_ON_LOOP"

# what trio raises when a thread's trio function is called on a trio thread
_TRIO_THREAD_ONLY = ("wasn't created by Trio", "call run() from inside a run()")

QUICK_SECONDS = 0.001
"""A run longer than this (wall, in the task) is not quick."""

STREAK = 3
"""Quick runs in a row, in a thread, before a kind of task may run on the loop."""

SPEC_BYTES = 4096
"""Larger run specs are unpickled in a thread, never on the loop."""

RESULT_BYTES = 64 * 1024
"""A run whose result is larger (``sizeof``) is not quick."""


def went_well(done: Any) -> bool:
    """Did this run (an ``executor.Done``) end in a plain, small result?"""
    return (
        done.error is None
        and done.coroutine is None
        and not done.rescheduled
        and done.nbytes <= RESULT_BYTES
    )


def loop_only_error(exc: BaseException | None) -> bool:
    """Did a task on the loop fail only because it ran there, not in a task thread?"""
    if isinstance(exc, RunInThread):
        return True
    return type(exc) is RuntimeError and any(m in str(exc) for m in _TRIO_THREAD_ONLY)


def kind_of(key: Any) -> str | None:
    """``inc`` for ``inc-<token>``, ``x`` for ``("x-<token>", 0)``; ``None`` if neither."""
    if type(key) is tuple:
        key = key[0] if key else None
    if type(key) is not str:
        return None
    return key.rpartition("-")[0] or key


class QuickTasks:
    """One worker's record of which kinds of task are quick (see the module doc).

    ``note`` runs in task threads and on the loop; a lost update between two threads
    only delays or resets a streak.
    """

    __slots__ = ("_banned", "_need", "_streak", "enabled")

    def __init__(self, enabled: bool | None = None) -> None:
        if enabled is None:
            enabled = os.environ.get(ENV, "1").strip() not in ("0", "")
        self.enabled = enabled
        self._streak: dict[str, int] = {}
        self._need: dict[str, int] = {}  # the streak a kind needs, if not ``STREAK``
        self._banned: set[str] = set()  # raised on the loop: threads only

    def watch(self, key: Any) -> str | None:
        """The kind whose runs to ``note``, if it may yet earn the loop."""
        if not self.enabled:
            return None
        kind = kind_of(key)
        return None if kind is None or kind in self._banned else kind

    def on_loop(self, key: Any, run_spec: Any) -> bool:
        """May this task (all threads idle, no dependencies) run on the loop?"""
        if not self.enabled or type(run_spec) is not bytes or len(run_spec) > SPEC_BYTES:
            return False
        kind = kind_of(key)
        if kind is None or kind in self._banned:
            return False
        return self._streak.get(kind, 0) >= self._need.get(kind, STREAK)

    def note(self, kind: str, seconds: float, ok: bool, *, on_loop: bool = False) -> None:
        """A run of ``kind`` took ``seconds`` and raised (``ok=False``) or not."""
        if ok and seconds <= QUICK_SECONDS:
            self._streak[kind] = self._streak.get(kind, 0) + 1
            return
        self._streak[kind] = 0
        if on_loop and not ok:
            self._banned.add(kind)
        elif on_loop:
            self._need[kind] = min(2 * self._need.get(kind, STREAK), 1 << 20)
