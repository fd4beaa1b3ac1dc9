"""The worker's task threads: one hop from the loop into a thread per task, one hop back
per batch of finished tasks.

``trio.to_thread.run_sync`` per task costs a trio task, a limiter round, a context copy
and a wake-up through trio's thread cache each way. Here instead a job goes on a
thread-safe queue read by persistent daemon threads, and each finished task lands in a
list handed back to the loop; only the thread that finds that list empty wakes the loop
(``TrioToken.run_sync_soon``), so tasks finishing together reach the core in one
``handle(*events)`` call. The thread also does the per-task work that needs no loop:
unpickling the run spec, ``sizeof`` and type name of the result, packing an exception.

Waking a thread costs the waker its CPU on a busy machine (the woken thread preempts it
and then waits for the GIL the waker holds), so jobs are handed to the threads just
before the loop waits for I/O (a trio ``Instrument``), after the loop has done the rest
of what the finished task set off (e.g. writing ``TaskFinished`` to the scheduler);
a loop that stays busy hands them over after ``MAX_DEFERRALS`` rounds anyway. A job
that finds every thread idle goes at once: nothing finished is waiting to be written,
and deferring it would put the loop's other writes ahead of the task (a lone
``submit(...).result()`` waited behind them).

A job goes to an idle thread or starts a new one, except a prefetched one (``behind``:
the core started it with every thread slot taken), which waits in the queue for the next
thread that finishes its task, so that thread goes straight on to it without a round
trip through the loop; it starts a thread only while fewer than ``nthreads`` threads take
jobs. A seceded task keeps its thread and stops counting as one that takes jobs (a
prefetched job waiting behind it gets a new thread); a thread that finishes a task while
more than ``nthreads`` do leaves. Threads are daemons: a task that never returns does not
keep the process alive.

A lone job of a kind known to be quick skips the threads: it is parked, and the worker
runs it on the loop once the event that started it is handled (``run_parked``; which
jobs, and why: ``quick_tasks``).
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import trio
from dask.sizeof import sizeof
from dask.utils import typename

from trioscheduler.core.messages import ExecuteFailure, ExecuteSuccess, RescheduleEvent
from trioscheduler.server import task_context
from trioscheduler.server.profiling import EXECUTING
from trioscheduler.server.quick_tasks import QuickTasks, kind_of, loop_only_error, went_well
from trioscheduler.wire import busy_poll, runspec
from trioscheduler.wire.remote_error import pack_exception

logger = logging.getLogger("trioscheduler.worker")

MAX_DEFERRALS = 4
"""Loop rounds without a wait for I/O that may pass before queued jobs go out anyway."""

_SMALL = frozenset({int, float, bool, str, bytes, type(None)})
_type_names: dict[type[Any], str] = {}

PUSH_MAX_BYTES = 1024
"""A result at most this big (``sizeof``), of an immutable builtin type, is pushed."""
_PUSHABLE = frozenset({int, float, bool, str, bytes, type(None)})


def pushable(value: Any, nbytes: int) -> bool:
    """Does ``value`` travel with its task's completion (worker -> scheduler -> clients)?

    Only small immutable builtins: they cost less to push than a ``get_data`` round
    trip to fetch, can be shared by reference in memory, and always serialize (ints
    only within 64 bits, which msgpack carries).
    """
    t = type(value)
    if t not in _PUSHABLE or nbytes > PUSH_MAX_BYTES:
        return False
    return t is not int or -(1 << 63) <= value < (1 << 63)


def nbytes_and_type(value: Any) -> tuple[int, str]:
    """``dask.sizeof`` and type name of a task's value; small builtins skip the dispatch."""
    cls = type(value)
    try:
        nbytes = sys.getsizeof(value) if cls in _SMALL else int(sizeof(value))
    except Exception:
        nbytes = 0
    name = _type_names.get(cls)
    if name is None:
        name = _type_names[cls] = typename(cls)
    return nbytes, name


_Load = Callable[[Any, Mapping[Any, Any]], tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]


class Done:
    """How one task went, ready for the core: value, or a packed exception, or a
    reschedule; ``coroutine`` is set instead when the function is ``async def``."""

    __slots__ = (
        "coroutine", "error", "exception", "key", "nbytes", "push", "rescheduled", "start",
        "stop", "type_name", "value",
    )  # fmt: skip

    def __init__(self, key: Any) -> None:
        self.key = key
        self.value: Any = None
        self.exception: BaseException | None = None
        self.error: tuple[bytes, bytes, str, str] | None = None  # pack_exception(exception)
        self.rescheduled = False
        self.nbytes = 0
        self.type_name = ""
        self.push = False  # the value is small enough to go with the completion
        self.start = 0.0
        self.stop = 0.0
        self.coroutine: tuple[Any, tuple[Any, ...], dict[str, Any]] | None = None

    def fail(self, exc: BaseException) -> None:
        """Record ``exc`` as the task's error (packed here, off the loop when in a thread)."""
        self.exception = exc
        self.error = pack_exception(exc)

    def settle(self, value: Any) -> None:
        """Record ``value`` as the task's result, with its size and type name."""
        self.value = value
        self.nbytes, self.type_name = nbytes_and_type(value)
        self.push = pushable(value, self.nbytes)

    def event(self, stim: str, now: float) -> Any:
        """The worker core's event for this outcome (the value itself is stored by the
        caller, before the core hears of it)."""
        if self.rescheduled:
            return RescheduleEvent(stimulus_id=stim, now=now, key=self.key)
        if self.error is not None:
            blob, tb_blob, exc_text, tb_text = self.error
            return ExecuteFailure(
                stimulus_id=stim, now=now, key=self.key, exception=blob, traceback=tb_blob,
                exception_text=exc_text, traceback_text=tb_text, start=self.start,
                stop=self.stop,
            )  # fmt: skip
        # (positional: the fields' order is ExecuteSuccess's, and a call without
        # keywords costs less)
        return ExecuteSuccess(
            stim, now, self.key, self.nbytes, self.type_name, self.start, self.stop
        )


def run_job(
    key: Any, run_spec: Any, data: Mapping[Any, Any], load: _Load = runspec.unpack
) -> Done:
    """Load (``load``: ``runspec.unpack_alone`` for a task without dependencies) and
    call one run spec; never raises (a task's ``SystemExit`` included)."""
    done = Done(key)
    done.start = time.time()
    ident = threading.get_ident()
    EXECUTING[ident] = key  # call_stack / profile see which task this thread runs
    try:
        func, args, kwargs = load(run_spec, data)
        if inspect.iscoroutinefunction(func):
            done.coroutine = (func, args, kwargs)
            return done
        value = func(*args, **kwargs)
    except task_context.Reschedule:
        done.rescheduled = True
    except BaseException as exc:
        done.fail(exc)
    else:
        done.settle(value)
    finally:
        EXECUTING.pop(ident, None)
    done.stop = time.time()
    return done


class ThreadExecutor:
    """Persistent task threads for one worker, results handed back in batches.

    ``submit``, ``wait``, ``start`` and ``close`` run on the loop, ``deliver`` anywhere;
    ``start`` comes before the first ``submit``.
    """

    def __init__(
        self,
        worker: Any,
        nthreads: int,
        *,
        name: str = "trioscheduler-task",
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self.worker = worker
        # called in the loop (instead of waking ``wait``) when tasks finished: ``take``
        self.on_done = on_done
        self.nthreads = nthreads
        self.name = name
        # Jobs wait in a deque; each has one byte in a pipe, which idle threads read. A
        # pipe, not a lock or queue.SimpleQueue: os.write drops the GIL while it wakes a
        # thread, so the woken thread can run instead of waiting for the loop's GIL.
        self._jobs: deque[tuple[Any, bytes, Mapping[Any, Any]]] = deque()
        self._rfd = self._wfd = -1
        self._lock = threading.Lock()
        self._threads = 0  # started and not yet left
        # threads waiting for a job, minus jobs queued: below 0, prefetched jobs wait for
        # busy threads
        self._idle = 0
        self._running: set[Any] = set()  # keys of the jobs threads run now
        self._seceded: set[Any] = set()  # of those, the seceded ones (their threads take no job)
        self._serial = 0
        self._done: list[Done] = []  # finished, not yet taken by the loop
        self._woken = False  # a wake-up for the loop is on its way
        self._closed = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = trio.Event()
        # not yet queued: (job, behind)
        self._pending: list[tuple[tuple[Any, bytes, Mapping[Any, Any]], bool]] = []
        self._deferred = 0  # loop rounds the pending jobs waited without an I/O wait
        # prefetched jobs submitted between ``hold`` and ``release``, queued together
        self._holds = 0
        self._held: list[tuple[tuple[Any, bytes, Mapping[Any, Any]], bool]] = []
        self._instrument: _HandOver | None = None
        self._ungate: Callable[[], None] | None = None  # removes the busy-poll gate
        # called in the task's thread with each finished task before the loop gets it
        # (the worker places large results in shared memory there: ``same_host``)
        self.after_task: Callable[[Done], None] | None = None
        self.quick = QuickTasks()
        self._watched: dict[Any, str] = {}  # key -> kind, of lone jobs run in a thread
        # a lone quick job waiting for ``run_parked`` (read by the worker after each step)
        self.parked: tuple[Any, bytes, Mapping[Any, Any]] | None = None
        self._on_loop = False  # a parked job (or what its end set off) runs on the loop

    def start(self) -> None:
        """Remember the loop to wake and hook into its I/O waits."""
        self._token = trio.lowlevel.current_trio_token()
        self._rfd, self._wfd = os.pipe()
        self._instrument = _HandOver(self)
        trio.lowlevel.add_instrument(self._instrument)
        self._ungate = busy_poll.add_gate(self.idle)

    def idle(self) -> bool:
        """No task thread runs a task or has one waiting: the loop may busy-poll (it
        would hold the GIL those threads want, ``wire.busy_poll``)."""
        return not (self._running or self._jobs or self._pending or self._held)

    def submit(
        self,
        key: Any,
        run_spec: Any,
        data: Mapping[Any, Any],
        *,
        behind: bool = False,
        alone: bool = False,
    ) -> None:
        """Run ``run_spec`` in a task thread; its ``Done`` comes back through ``wait``.

        The job reaches a thread when the loop next waits for I/O (see the module doc),
        or at once if every thread is idle: then no finished task's follow-up is
        waiting to be written, and the job is the round trip's critical path. A
        prefetched job (``behind``) is queued at once (after any pending before it), for
        the next thread that frees. A job with no dependencies (``alone``) that finds
        every thread idle is parked for ``run_parked`` if its kind is quick.
        """
        if self.parked is not None:  # not alone after all: the parked job goes first
            parked, self.parked = self.parked, None
            self._queue(parked)
        if self._held and not behind:  # held prefetched jobs go first
            self._queue_held()
        if self._pending:
            self._pending.append(((key, run_spec, data), behind))
        elif behind and self._holds:
            self._held.append(((key, run_spec, data), True))
        elif behind or self._instrument is None:
            self._queue((key, run_spec, data), behind=behind)
        elif self._idle > 0 and self._idle == self._threads:
            if alone and not self._on_loop and self.quick.on_loop(key, run_spec):
                self.parked = (key, run_spec, data)
                return
            kind = self.quick.watch(key) if alone else None
            if kind is not None:
                self._watched[key] = kind
            self._queue((key, run_spec, data))
        else:
            self._pending.append(((key, run_spec, data), False))

    def hold(self) -> None:
        """Until the matching ``release``, prefetched jobs wait to be queued together: a
        worker's core prefetches a burst of tasks in one ``handle``, and one hand-over
        for the burst costs one write to the pipe instead of one per task (each a system
        call that lets go of the GIL, so the task thread may take it in between)."""
        self._holds += 1

    def release(self) -> None:
        """Queue the prefetched jobs held since the first ``hold`` (calls nest)."""
        self._holds -= 1
        if not self._holds and self._held:
            self._queue_held()

    def _queue_held(self) -> None:
        jobs, self._held = self._held, []
        self._queue_many(jobs)

    def run_parked(self, finished: Callable[[list[Done]], None]) -> None:
        """(Loop.) Run the parked job here and pass its ``Done`` to ``finished``; the
        jobs that sets off go to the threads. One that failed only because it ran on
        the loop runs again in a thread, whose outcome is the task's (``quick_tasks``)."""
        job, self.parked = self.parked, None
        if job is None or self._closed:
            return
        key, run_spec, data = job
        self._on_loop = True
        try:
            tokens = (
                task_context.current_worker.set(self.worker),
                task_context.current_key.set(key),
                task_context.on_loop.set(True),
            )
            try:
                done = run_job(key, run_spec, data, runspec.unpack_alone)  # (no dependencies)
            finally:
                task_context.on_loop.reset(tokens[2])
                task_context.current_key.reset(tokens[1])
                task_context.current_worker.reset(tokens[0])
            needs_thread = loop_only_error(done.exception)
            kind = kind_of(key)
            if kind is not None:  # (a task's own error ends the streak, as in a thread)
                mine = done.error is not None and not needs_thread
                self.quick.note(kind, done.stop - done.start, went_well(done), on_loop=not mine)
            if needs_thread:
                self._queue(job)
                return
            if self.after_task is not None:
                try:
                    self.after_task(done)
                except Exception:  # the task's result stays as it is
                    logger.exception("after task %r", done.key)
            finished([done])
        finally:
            self._on_loop = False

    def hand_over(self, timeout: float) -> None:
        """Queue the pending jobs: the loop is about to wait ``timeout`` seconds for I/O.
        (A job still parked, which nobody ran, goes to a thread.)"""
        if self.parked is not None and not self._on_loop:
            parked, self.parked = self.parked, None
            self._queue(parked)
        if not self._pending:
            return
        if timeout <= 0 and self._deferred < MAX_DEFERRALS:
            self._deferred += 1
            return
        self._deferred = 0
        jobs, self._pending = self._pending, []
        self._queue_many(jobs)

    def _queue(self, job: tuple[Any, bytes, Mapping[Any, Any]], *, behind: bool = False) -> None:
        self._queue_many([(job, behind)])

    def _queue_many(self, jobs: list[tuple[tuple[Any, bytes, Mapping[Any, Any]], bool]]) -> None:
        """Queue ``(job, behind)`` pairs in order: one byte each in the pipe, written at
        once, and the threads they need started."""
        spawns: list[int] = []
        with self._lock:
            if self._closed:
                return
            for job, behind in jobs:
                spawn = self._idle <= 0
                if behind and spawn:  # waits for a busy thread, if enough take jobs
                    spawn = self._threads - len(self._seceded) < self.nthreads
                if spawn:
                    self._threads += 1
                    self._serial += 1
                    spawns.append(self._serial)
                else:
                    self._idle -= 1
                self._jobs.append(job)
        os.write(self._wfd, b"\0" * len(jobs))
        for serial in spawns:
            self._spawn(serial)

    def _spawn(self, serial: int) -> None:
        t = threading.Thread(target=self._work, name=f"{self.name}-{serial}", daemon=True)
        t.start()

    def secede(self, key: Any) -> None:
        """The task ``key`` seceded: its thread takes no job until it ends. A prefetched
        job waiting for a thread gets a new one if fewer than ``nthreads`` take jobs."""
        with self._lock:
            if key not in self._running or self._closed:
                return  # (an ``async def`` task: it runs on the loop, not in a thread)
            self._seceded.add(key)
            spawn = self._idle < 0 and self._threads - len(self._seceded) < self.nthreads
            if spawn:
                self._threads += 1
                self._idle += 1
                self._serial += 1
                serial = self._serial
        if spawn:
            self._spawn(serial)

    def deliver(self, done: Done, *, idle: bool = False) -> bool:
        """Hand ``done`` to the loop (any thread); wakes the loop only if it was idle.

        ``idle``: the calling task thread is done with ``done``'s job and takes its next
        one right after, so it counts as idle in the same step (else a job submitted in
        between would start a thread); unless more than ``nthreads`` threads take jobs:
        then it leaves (returns True) and counts as gone.
        """
        leave = False
        with self._lock:
            self._done.append(done)
            if idle:
                self._running.discard(done.key)
                self._seceded.discard(done.key)
                if self._threads - len(self._seceded) > self.nthreads:
                    leave = True
                    self._threads -= 1
                    if self._closed and self._threads == 0:
                        os.close(self._rfd)
                else:
                    self._idle += 1
            if self._woken:
                return leave
            self._woken = True
        token = self._token
        if token is None:
            return leave
        try:
            token.run_sync_soon(self._wake)
        except trio.RunFinishedError:
            pass
        return leave

    def _wake(self) -> None:
        if self.on_done is not None:
            self.on_done()
        else:
            self._ready.set()

    def take(self) -> list[Done]:
        """The finished tasks, in the order they finished (``on_done``'s callee)."""
        with self._lock:
            done, self._done = self._done, []
            self._woken = False
        return done

    async def wait(self) -> list[Done]:
        """Wait for finished tasks and take them all, in the order they finished."""
        await self._ready.wait()
        self._ready = trio.Event()
        with self._lock:
            done, self._done = self._done, []
            self._woken = False
        return done

    def close(self) -> None:
        """Let idle threads leave and refuse new jobs; running tasks finish on their own."""
        if self._ungate is not None:
            self._ungate()
            self._ungate = None
        if self._instrument is not None:
            try:
                trio.lowlevel.remove_instrument(self._instrument)
            except (KeyError, RuntimeError):  # already removed, or outside the run
                pass
            self._instrument = None
        self._pending.clear()
        self._held.clear()
        self.parked = None
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._wfd < 0:
                return
            os.close(self._wfd)  # threads read EOF once the jobs queued before are taken
            if self._threads == 0:
                os.close(self._rfd)

    def _work(self) -> None:
        worker_var, key_var = task_context.current_worker, task_context.current_key
        worker_var.set(self.worker)
        job = self._next_job()  # the job this thread was started for (or an earlier one)
        while job is not None:
            key, run_spec, data = job
            key_var.set(key)
            try:
                done = run_job(key, run_spec, data)
            except BaseException as exc:  # pragma: no cover - run_job catches everything
                done = Done(key)
                done.fail(exc)
            key_var.set(None)
            if self._watched:
                kind = self._watched.pop(key, None)
                if kind is not None:
                    self.quick.note(kind, done.stop - done.start, went_well(done))
            del job, run_spec, data
            if self.after_task is not None:
                try:
                    self.after_task(done)
                except Exception:  # the task's result stays as it is
                    logger.exception("after task %r", done.key)
            if self.deliver(done, idle=True):
                return  # one thread too many: counted as gone
            del done
            job = self._next_job()
        with self._lock:
            self._threads -= 1
            if self._closed and self._threads == 0:
                os.close(self._rfd)

    def _next_job(self) -> tuple[Any, bytes, Mapping[Any, Any]] | None:
        """The next job, marked running; ``None`` once closed."""
        if not os.read(self._rfd, 1):
            return None  # closed
        with self._lock:
            job = self._jobs.popleft()
            self._running.add(job[0])
            return job


class _HandOver(trio.abc.Instrument):
    """Hands an executor's pending jobs to its threads before the loop waits for I/O."""

    def __init__(self, executor: ThreadExecutor) -> None:
        self.executor = executor

    def before_io_wait(self, timeout: float) -> None:
        try:
            self.executor.hand_over(timeout)
        except Exception:  # trio would drop the instrument and strand the jobs
            logger.exception("handing tasks to the task threads failed")
