"""The worker's I/O shell: sockets, threads and files around the worker core.

Everything this module does is carry out decisions of ``WorkerState``: events go in
(messages from the scheduler, a task that finished, a fetch that arrived, a memory
measurement), instructions come out (run this, fetch that from a peer, spill, unspill,
delete, tell the scheduler) and are carried out here. No policy lives in the shell.

One worker is one ``async with Worker(...)`` block owning a trio nursery:

* a data server on its own listener, answering peers and clients (``get_data``,
  ``update_data``, ``run``), per ``docs/runtime-contract.md``;
* one long-lived, batched stream to the scheduler (``AddWorker`` first, then events
  both ways, a heartbeat about every second);
* a memory monitor feeding ``MemoryMeasured`` (psutil RSS) to the core;
* tasks on persistent threads (``trioscheduler.server.executor``), one hop there and one back
  per batch of finished tasks; fetches through a connection pool.

A lost scheduler stream (a cut link, a killed scheduler) does not end the worker: the
core releases what the scheduler had asked for (``SchedulerLost``), the values stay, and
the worker dials again with exponential back-off, offering them in ``AddWorker.data``,
for up to ``death_timeout`` seconds (then it closes). So does a ``CloseWorker`` sent
because the scheduler heard nothing for too long: the worker is alive after all.

Shutdown, on leaving the block, on ``close()``, when the scheduler sends
``CloseWorker``, or after ``death_timeout`` without a scheduler: tell the scheduler
``RemoveWorker(expected=True)`` (if connected), close the stream,
cancel running work, close the listener, remove the spill directory.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Any

import psutil
import trio

from trioscheduler import wire
from trioscheduler.core import recorder, shm_policy
from trioscheduler.core.messages import (
    AddWorker,
    CloseWorker,
    DeleteData,
    Execute,
    GatherDep,
    RemoveWorker,
    RetireWorker,
    SchedulerLost,
    SecedeEvent,
    Spill,
    SpillWritten,
    ToScheduler,
    Unspill,
)
from trioscheduler.core.worker import WorkerState
from trioscheduler.server import diagnostics, memory, profiling, same_host, task_context
from trioscheduler.server import worker_monitor as monitor
from trioscheduler.server.actors import ActorHost
from trioscheduler.server.event_log import EventLogWriter
from trioscheduler.server.executor import Done, ThreadExecutor
from trioscheduler.server.lifecycle import RunsInAsyncWith
from trioscheduler.server.plugins import WorkerPlugins
from trioscheduler.server.preload import preloads
from trioscheduler.server.spill_writer import SpillWriter
from trioscheduler.server.stimuli import now as _now
from trioscheduler.server.stimuli import stimulus as _stimulus
from trioscheduler.server.worker_peers import gather_dep, serve_peer
from trioscheduler.wire import shm
from trioscheduler.wire.address import default_host, tcp_address
from trioscheduler.wire.security import Security, connect_args, listen_args
from trioscheduler.wire.security import resolve as resolve_security

logger = logging.getLogger("trioscheduler.worker")

_inproc_ids = itertools.count(1)


#: ``0`` switches same-host shared-memory transfers off for workers started without
#: ``shared_memory=`` (e.g. the processes of a ``LocalCluster``).
SHARED_MEMORY_ENV = shm.ENV

PREFETCH = 64
"""Short tasks per thread the core may queue behind the running ones (``prefetch=``):
each worth at most ``WorkerState.prefetch_duration`` (1 ms per thread in all)."""
_RETIRE_GRACE = 10.0  # seconds a retiring worker waits for the scheduler to close it
DEATH_TIMEOUT = 60.0  # default seconds to keep dialling a lost scheduler before closing
_BACKOFF = (0.1, 5.0)  # first and longest wait between two attempts to rejoin



class Worker(RunsInAsyncWith):
    """A worker: ``async with Worker(scheduler_address, nthreads=2) as w: await w.finished()``.

    ``address`` is where this worker serves its data (``None``: ``inproc://`` when the
    scheduler is in-process, else ``tcp://<host>:0`` with ``host`` chosen by
    ``default_host``; ``w.address`` is the bound one). ``memory_limit`` as in
    ``memory.parse_memory_limit`` (``nworkers`` workers share this host for ``"auto"``).
    ``transfer_incoming_bytes_limit``: bytes fetched from peers at once (``"auto"``: 10%
    of the memory limit, as dask; None: no limit). ``death_timeout``: how long to keep
    dialling a scheduler whose stream was lost before closing (``None``: for ever);
    ``connect_timeout`` bounds the first connection.
    """

    def __init__(
        self,
        scheduler_address: str,
        *,
        address: str | None = None,
        nthreads: int = 1,
        memory_limit: str | float | None = "auto",
        resources: dict[str, float] | None = None,
        name: str | None = None,
        local_directory: str | None = None,
        nanny: str | None = None,
        nworkers: int = 1,
        memory_target_fraction: float | None = memory.TARGET,
        memory_spill_fraction: float | None = memory.SPILL,
        memory_pause_fraction: float | None = memory.PAUSE,
        transfer_incoming_count_limit: int = 4,
        transfer_message_bytes_limit: int = 50_000_000,
        transfer_incoming_bytes_limit: str | int | None = "auto",
        heartbeat_interval: float = 1.0,
        memory_monitor_interval: float = 0.25,
        batch_interval: float = 0.002,
        connect_timeout: float = 10.0,
        death_timeout: float | None = DEATH_TIMEOUT,
        validate: bool = False,
        contact_address: str | None = None,
        preload: Sequence[str] = (),
        lifetime: float | None = None,
        lifetime_stagger: float = 0.0,
        lifetime_restart: bool = False,
        security: Security | bool | None = None,
        shared_memory: bool | None = None,
        record: str | os.PathLike[str] | None = None,
        prefetch: int | None = None,
    ) -> None:
        if nthreads < 1:
            raise ValueError(f"nthreads must be at least 1, got {nthreads}")
        self.security = resolve_security(security)
        self.scheduler_address = scheduler_address
        self._listen_address = address
        self.nthreads = nthreads
        # short tasks the core may queue behind the running ones (``WorkerState.prefetch``)
        self.prefetch = PREFETCH * nthreads if prefetch is None else max(0, prefetch)
        self.memory_limit = memory.parse_memory_limit(memory_limit, nworkers=nworkers)
        self.resources = dict(resources or {})
        self.name = name
        # this run's name: a scatter's report names it, so the scheduler can tell us
        # from a worker that registers at our address after we are gone
        self.incarnation = uuid.uuid4().hex
        self.local_directory = local_directory
        self.nanny = nanny
        self._thresholds = (memory_target_fraction, memory_spill_fraction, memory_pause_fraction)
        self._transfer_limits = (
            transfer_incoming_count_limit, transfer_message_bytes_limit,
            memory.incoming_bytes_limit(transfer_incoming_bytes_limit, self.memory_limit),
        )  # fmt: skip
        self.heartbeat_interval = heartbeat_interval
        self.memory_monitor_interval = memory_monitor_interval
        self.batch_interval = batch_interval
        self.connect_timeout = connect_timeout
        if death_timeout is not None and death_timeout < 0:
            raise ValueError(f"death_timeout must be >= 0 seconds, got {death_timeout!r}")
        self.death_timeout = death_timeout
        self.reconnections = 0  # times this worker rejoined a scheduler after losing it
        self.validate = validate
        self.contact_address = contact_address  # what others dial, if not where we listen
        self.preload = list(preload)
        if lifetime is not None and lifetime <= 0:
            raise ValueError(f"lifetime must be a positive number of seconds, got {lifetime!r}")
        # dask's lifetime: close after ``lifetime`` +- ``lifetime_stagger`` seconds (so a
        # fleet started together does not leave together); a nanny restarts the worker
        # if ``lifetime_restart``.
        self.lifetime = lifetime
        if lifetime is not None and lifetime_stagger:
            self.lifetime = max(0.0, lifetime + random.uniform(-lifetime_stagger, lifetime_stagger))
        self.lifetime_restart = lifetime_restart
        # Large buffers to and from workers on this host go through shared memory
        # (``wire.shm``); the threshold is ``shm_policy``'s. Default: on, unless the
        # environment says ``TRIOSCHEDULER_SHARED_MEMORY=0``.
        if shared_memory is None:
            shared_memory = shm.enabled_by_environment()
        self.shared_memory = shared_memory and shm.HOST_ID is not None
        self.shared_memory_threshold = shm_policy.SHM_MIN_BYTES
        self._no_shm_peers: set[str] = set()  # peers whose segments we could not map
        # large results go into shared memory as their task returns (``same_host``)
        self.placer = same_host.ResultPlacer(self)
        self.restart_after_close = False  # a nanny should start a new worker after us
        # ``record``: every event handed to the core, to this file (``event_log``):
        # ``recorder.replay(event_log.load_log(path))`` rebuilds the core's state
        self.record = record
        self._log: EventLogWriter | None = None

        self.address: str = ""
        self.status = "created"  # created -> running -> closing -> closed
        self.close_reason = ""
        self.state: WorkerState | None = None
        self.store: memory.DataStore | None = None
        self.runner = task_context.TaskRunner(self, nthreads)
        self.actors = ActorHost(self)  # instances of submit(Cls, actor=True) made here
        self.plugins = WorkerPlugins(self)
        self._executor = ThreadExecutor(self, nthreads, on_done=self._tasks_done)
        self._executor.after_task = self.placer
        self.trio_token: trio.lowlevel.TrioToken | None = None  # the loop running this worker
        self._process = psutil.Process()
        self._life: AbstractAsyncContextManager[Any] | None = None  # _run(), while open
        self._nursery: trio.Nursery | None = None
        self._work: trio.Nursery | None = None
        self._work_scope: trio.CancelScope | None = None
        self._pool: wire.ConnectionPool | None = None
        self._stream: wire.Stream | None = None
        self._batched: wire.BatchedSend | None = None
        self._closing = False
        self._closing_ev = trio.Event()  # shutdown began
        self._link_stop = trio.Event()  # the current stream's batched sender closes
        self._batched_done = trio.Event()  # the batched sender flushed and closed
        self._link_up = 0.0  # when the current stream registered (trio clock)
        self._outage: tuple[float, int] | None = None  # since when, attempts made
        self._shutdown_done = trio.Event()  # streams closed, work cancelled
        self._closed = trio.Event()  # everything released
        self._executing: set[Any] = set()
        self._slot_waiters = 0  # Execute instructions waiting for a thread slot
        self._transfers: list[list[Any]] = []  # [start, stop, peer, nbytes, [key], n]
        # Spill files are written in a thread by one writer task, which reports each
        # finished write to the core (``SpillWritten``): ``server/spill_writer.py``.
        self._spill_writer: SpillWriter | None = None
        self._unusable_reported: set[Any] = set()  # keys whose values cannot travel, said

    def __repr__(self) -> str:
        return f"<Worker {self.address or '(not started)'} {self.status} nthreads={self.nthreads}>"

    # ----------------------------------------------------------------------------------
    # Life cycle
    # ----------------------------------------------------------------------------------

    async def finished(self) -> None:
        """Wait until the worker has shut down (``CloseWorker``, no scheduler for
        ``death_timeout``, ``close``)."""
        await self._shutdown_done.wait()

    async def close(self, reason: str = "worker closed") -> None:
        """Shut down in order (the ``async with`` block still has to be left)."""
        await self._shutdown(reason, report=True)

    @asynccontextmanager
    async def _run(self) -> AsyncIterator[Worker]:
        self.store = memory.DataStore(self.local_directory)
        self._spill_writer = SpillWriter(self.store, self._start, self.handle, self)
        self.store.remove = self._spill_writer.remove_later
        self.trio_token = trio.lowlevel.current_trio_token()
        self._executor.start()
        diagnostics.install_log_buffer()  # get_worker_logs, the dashboard's /info/logs
        try:
            async with wire.background_nursery() as nursery:  # the block's error, unwrapped
                self._nursery = nursery
                await nursery.start(self._background)
                listen_at = self._listen_address or self._default_listen_address()
                async with (
                    wire.listen(
                        listen_at,
                        partial(serve_peer, self),
                        role="worker",
                        info=same_host.hello_info(self),
                        peer_speaks_first=True,
                        **listen_args(self.security, "worker"),
                    ) as listener,
                    wire.ConnectionPool(**connect_args(self.security, "worker")) as pool,
                ):
                    self.address = self.contact_address or listener.address
                    self._pool = pool
                    async with preloads(self.preload, self):
                        await self._connect()
                        self.status = "running"
                        logger.info(
                            "worker %s (%d thread(s)) joined %s",
                            self.address,
                            self.nthreads,
                            self.scheduler_address,
                        )
                        try:
                            yield self
                        finally:
                            with trio.CancelScope(shield=True):
                                await self._shutdown("worker closed", report=True)
        finally:
            self._executor.close()
            self.store.close()
            if self._log is not None:
                self._log.close()
            self.status = "closed"
            self._closed.set()

    def _default_listen_address(self) -> str:
        scheme, _, _ = wire.parse_address(self.scheduler_address)
        if scheme == "inproc":
            return f"inproc://worker-{os.getpid()}-{next(_inproc_ids)}"
        return tcp_address(default_host(self.scheduler_address), 0, scheme)

    async def _background(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Hosts the cancellable work (tasks, fetches, loops) apart from the user's block."""
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as work:
                self._work, self._work_scope = work, scope
                task_status.started()
                await trio.sleep_forever()

    async def _connect(self) -> None:
        target, spill, pause = self._thresholds
        count_limit, bytes_limit, incoming_limit = self._transfer_limits
        settings: dict[str, Any] = dict(
            nthreads=self.nthreads, resources=self.resources, memory_limit=self.memory_limit or 0,
            target=target, spill=spill, pause=pause, write_ahead=memory.WRITE_AHEAD,
            transfer_incoming_count_limit=count_limit, transfer_message_bytes_limit=bytes_limit,
            transfer_incoming_bytes_limit=incoming_limit, validate=self.validate,
            prefetch=self.prefetch,
        )  # fmt: skip
        self.state = WorkerState(self.address, **settings)
        if self.record is not None:
            head = recorder.header("worker", {"address": self.address, **settings})
            self._log = EventLogWriter.create(self.record, head, fsync_interval=None)
        await self._join(self.connect_timeout)
        assert self._work is not None
        self._work.start_soon(monitor.heartbeat_loop, self)
        profiling.sampler()  # Client.profile: samples task threads while tasks run
        self._work.start_soon(monitor.memory_loop, self)
        if self.lifetime is not None:
            self._work.start_soon(self._end_of_life, self.lifetime)

    async def _join(self, within: float) -> None:
        """Connect, register (with the values held: none at first), start the stream's
        batched sender and reader."""
        assert self.state is not None
        stream = await wire.connect(
            self.scheduler_address,
            timeout=within,
            role="worker",
            info={"address": self.address, "name": self.name},
            **connect_args(self.security, "worker"),
        )
        try:
            await stream.send(
                AddWorker(
                    stimulus_id=_stimulus("worker-connect"),
                    now=_now(),
                    worker=self.address,
                    nthreads=self.nthreads,
                    memory_limit=self.memory_limit or 0,
                    resources=self.resources,
                    name=self.name,
                    nanny=self.nanny,
                    data=self.state.held(),
                    incarnation=self.incarnation,
                )
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise
        assert self._nursery is not None and self._work is not None
        self._stream = stream
        self._link_stop, self._batched_done = stop, done = trio.Event(), trio.Event()
        self._link_up = _now()
        self._batched = await self._nursery.start(self._run_batched, stream, stop, done)
        self._work.start_soon(self._read_scheduler, stream)

    async def _run_batched(
        self,
        stream: Any,
        stop: trio.Event,
        done: trio.Event,
        *,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Owns one stream's batched sender; it flushes and closes on ``stop``
        (shutdown, or the stream was lost)."""
        try:
            async with wire.open_batched(stream, self.batch_interval) as batched:
                task_status.started(batched)
                await stop.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            logger.debug("worker %s: batched stream ended: %r", self.address, exc)
        finally:
            done.set()

    async def _shutdown(self, reason: str, *, report: bool) -> None:
        """Idempotent orderly shutdown; later callers wait for the first to finish."""
        if self._closing:
            await self._shutdown_done.wait()
            return
        self._closing = True
        self.status = "closing"
        self.close_reason = reason
        logger.info("worker %s closing: %s", self.address, reason)
        with trio.move_on_after(5):
            await self.plugins.teardown_all()
            if report and self._batched is not None:
                await self._say_goodbye(reason)
            self._closing_ev.set()
            self._link_stop.set()  # the batched sender closes
            await self._batched_done.wait()
            if self._work_scope is not None:
                self._work_scope.cancel()
            if self._stream is not None:
                try:
                    await self._stream.aclose()
                except Exception as exc:
                    logger.debug("worker %s: closing the scheduler stream: %r", self.address, exc)
        self._shutdown_done.set()

    async def _say_goodbye(self, reason: str) -> None:
        """``RemoveWorker`` after everything queued before it (expected, unless tasks run).

        Through the batched sender while it runs; straight on the stream once it was
        cancelled (the worker's block was cancelled from outside, e.g. by a signal).
        """
        batched, stream = self._batched, self._stream
        if batched is None or stream is None:
            return
        # Closing on our own (a signal, the block left) while tasks run interrupts them:
        # not an expected departure, so they count towards allowed_failures. A task that
        # signals its own worker must end in KilledWorker, not in restarts for ever.
        expected = not self._executing or reason.startswith("the scheduler asked")
        if not expected:
            reason = f"{reason} while running {len(self._executing)} task(s)"
        goodbye = RemoveWorker(
            stimulus_id=_stimulus("worker-close"),
            now=_now(),
            worker=self.address,
            expected=expected,
            reason=reason,
        )
        try:
            try:
                batched.send_nowait(goodbye)
                await batched.flush()
            except trio.ClosedResourceError:
                await stream.send(goodbye)
        except Exception as exc:
            logger.debug("worker %s: could not say goodbye: %r", self.address, exc)

    # ----------------------------------------------------------------------------------
    # Scheduler stream
    # ----------------------------------------------------------------------------------

    async def _read_scheduler(self, stream: Any) -> None:
        """Feed the scheduler's messages to the core, all that arrived together in one
        ``handle`` call, until ``CloseWorker`` or the stream ends; then close, or rejoin
        if the scheduler was lost (see ``_rejoin``)."""
        reason = "the scheduler closed the connection"
        lost = True
        try:
            while True:
                try:
                    msgs = await stream.receive_batch()
                except trio.EndOfChannel:
                    break
                closing = None
                for m in msgs:  # (a plain loop: cheaper than a generator for a batch or two)
                    if type(m) is CloseWorker:
                        closing = m
                        break
                if closing is not None:
                    self.handle(*msgs[: msgs.index(closing)])
                    reason = f"the scheduler asked: {closing.reason}"
                    lost = WorkerState.closing_is_loss(closing)
                    break
                self.handle(*msgs)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            reason = f"lost the scheduler connection ({type(exc).__name__}: {exc})"
        if self._closing or stream is not self._stream:
            return
        if lost and self.death_timeout != 0:
            assert self._work is not None
            self._work.start_soon(self._rejoin, stream, reason)
            return
        assert self._nursery is not None
        self._nursery.start_soon(self._shutdown_in_background, reason)

    async def _rejoin(self, stream: Any, reason: str) -> None:
        """The scheduler stream was lost: drop it, let the core release the scheduler's
        work, and dial again with exponential back-off (``_BACKOFF``, with jitter) until
        registered or ``death_timeout`` passed since the outage began; then close.

        A stream that dies within two heartbeats of registering (a scheduler that still
        had our old stream, say) continues the same outage: its deadline and back-off.
        """
        self._batched = None  # messages from now on are dropped: the rejoin reconciles
        self._link_stop.set()
        with trio.move_on_after(1):
            await self._batched_done.wait()
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await stream.aclose()
            except Exception as exc:
                logger.debug("worker %s: closing the lost stream: %r", self.address, exc)
        now = _now()
        if self._outage is not None and now - self._link_up < 2 * self.heartbeat_interval:
            since, attempts = self._outage
        else:
            since, attempts = now, 0
            logger.warning(
                "worker %s: %s; rejoining %s (for up to %s)", self.address, reason,
                self.scheduler_address,
                "ever" if self.death_timeout is None else f"{self.death_timeout:g} s",
            )  # fmt: skip
        self.handle(SchedulerLost(stimulus_id=_stimulus("scheduler-lost"), now=now))
        first, longest = _BACKOFF
        while not self._closing:
            left = None if self.death_timeout is None else since + self.death_timeout - _now()
            if attempts:  # back off before every attempt but an outage's first
                delay = min(longest, first * 2 ** min(attempts - 1, 16))
                delay *= random.uniform(0.5, 1.0)
                if left is not None:
                    delay = min(delay, max(left, 0.0))
                await trio.sleep(delay)
                left = None if self.death_timeout is None else since + self.death_timeout - _now()
            if left is not None and left <= 0:
                break
            attempts += 1
            self._outage = (since, attempts)
            try:
                await self._join(
                    self.connect_timeout if left is None else min(left, self.connect_timeout)
                )
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                    trio.EndOfChannel, trio.TooSlowError, wire.ProtocolError) as exc:  # fmt: skip
                logger.info(
                    "worker %s: rejoining %s, attempt %d failed: %s: %s", self.address,
                    self.scheduler_address, attempts, type(exc).__name__, exc,
                )  # fmt: skip
                continue
            self.reconnections += 1
            logger.info(
                "worker %s rejoined %s (attempt %d) holding %d key(s)", self.address,
                self.scheduler_address, attempts, len(self.state.held() if self.state else ()),
            )  # fmt: skip
            return
        assert self._nursery is not None
        self._nursery.start_soon(
            self._shutdown_in_background,
            f"{reason}; no scheduler at {self.scheduler_address} for {self.death_timeout} s",
        )

    async def _end_of_life(self, lifetime: float) -> None:
        """dask's ``lifetime``: after ``lifetime`` seconds, retire (the scheduler copies
        this worker's unique data elsewhere, then closes it); if no other worker can take
        the data within ``_RETIRE_GRACE`` seconds, close anyway, as dask does."""
        await trio.sleep(lifetime)
        logger.info("worker %s reached its lifetime (%.1f s): retiring", self.address, lifetime)
        self.restart_after_close = self.lifetime_restart
        self._send(RetireWorker(stimulus_id=_stimulus("lifetime"), now=_now(), worker=self.address))
        with trio.move_on_after(_RETIRE_GRACE):
            await self._closing_ev.wait()
            return
        assert self._nursery is not None
        self._nursery.start_soon(self._shutdown_in_background, "reached its lifetime")

    async def _shutdown_in_background(self, reason: str) -> None:
        with trio.CancelScope(shield=True):
            await self._shutdown(reason, report=True)

    def _send(self, msg: Any, lazy: bool = False) -> None:
        batched = self._batched
        if batched is None or self._closing:
            return
        try:
            if lazy:
                batched.send_later(msg)
            else:
                batched.send_nowait(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            logger.debug("worker %s: dropped %r: %s", self.address, msg, exc)

    def log_event(self, topic: str | list[str], msg: Any) -> None:
        """Record ``msg`` under ``topic`` on the scheduler (``Client.get_events``,
        ``subscribe_topic``); callable from a task thread or the worker's loop."""
        event = {"op": "log-event", "topic": topic, "msg": msg}
        try:
            in_loop = trio.lowlevel.current_trio_token() is self.trio_token
        except RuntimeError:
            in_loop = False
        if in_loop:
            self._send(event)
        else:
            trio.from_thread.run_sync(self._send, event, trio_token=self.trio_token)

    def metrics(self) -> dict[str, Any]:
        """What the heartbeat tells the scheduler (and dashboards) about this worker."""
        return monitor.metrics(self)

    # ----------------------------------------------------------------------------------
    # The core and its instructions
    # ----------------------------------------------------------------------------------

    def handle(self, *events: Any) -> None:
        """Feed events to the core and carry out its instructions (synchronously;
        running tasks and fetches start as background work)."""
        state = self.state
        if state is None or self._closing:
            return
        if self._log is not None:
            self._log.record(events)
        out = state.handle(*events)
        if self.plugins.watching:
            self.plugins.transitions()
        self._executor.hold()  # prefetched tasks go to the threads together
        try:
            while out:
                written: list[Any] = []  # spills with nothing to write: on disk already
                for ins in out:
                    kind = type(ins)
                    if kind is ToScheduler:
                        self._send(ins.msg, ins.lazy)
                    elif kind is Execute:
                        self._execute(ins.key, ins.run_spec, ins.behind)
                    elif kind is GatherDep:
                        self._start(gather_dep, self, ins.peer, ins.keys)
                    elif kind is Spill:  # the core counts it as being written; the
                        # file is written in a thread (a value stays readable meanwhile)
                        assert self._spill_writer is not None
                        ts = state.tasks.get(ins.key)
                        if not self._spill_writer.spill(ins.key, ts.nbytes if ts is not None else 0):
                            written.append(ins.key)
                    elif kind is Unspill:  # only marks the key: the task thread gathering
                        # the task's inputs reads it (``DataStore.__getitem__``), off the loop
                        assert self.store is not None
                        self.store.want(ins.key)
                    elif kind is DeleteData:
                        assert self.store is not None
                        self.store.delete(ins.key)
                        self.actors.forget(ins.key)
                    else:  # pragma: no cover - a new instruction type the shell does not know yet
                        logger.error("worker %s: unknown instruction %r", self.address, ins)
                if not written:
                    break
                # told after the instructions that came with the Spill, in their order
                done = SpillWritten(stimulus_id=_stimulus("spill-written"), now=_now(), keys=written)
                if self._log is not None:
                    self._log.record((done,))
                out = state.handle(done)
        finally:
            self._executor.release()
        if self._executor.parked is not None:  # a lone quick task: run here, now
            self._executor.run_parked(self._finished)  # (``quick_tasks``)

    def _start(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._work is not None and not self._closing:
            self._work.start_soon(fn, *args)

    def secede(self, key: Any) -> None:
        """A running task called ``secede()``: free its slot and tell the core."""
        self.runner.release(key)
        self._executor.secede(key)
        self.handle(SecedeEvent(stimulus_id=_stimulus("secede"), now=_now(), key=key))

    def _execute(self, key: Any, run_spec: Any | None, behind: bool = False) -> None:
        """Carry out ``Execute``: take the key's slot and queue it for a task thread.

        The core never starts more than ``nthreads`` tasks, but a task that rejoined
        after seceding holds a slot the core counts as free; then the task waits for one.
        A prefetched task (``behind``) takes no slot: it waits in the executor for a
        busy thread, unless other tasks wait for slots (then it waits for one too).
        """
        if run_spec is None:
            done = Done(key)
            done.fail(
                ValueError(f"task {key!r} has no run spec on this worker (its data was expected)")
            )
            done.start = done.stop = time.time()
            self._executor.deliver(done)
            return
        if behind and not self._slot_waiters:
            self._executing.add(key)
            assert self.store is not None
            self._executor.submit(key, run_spec, self.store, behind=True)
            return
        try:
            self.runner.slots.acquire_on_behalf_of_nowait(key)
        except trio.WouldBlock:
            self._slot_waiters += 1  # (counted down by _execute_when_free)
            self._start(self._execute_when_free, key, run_spec)
            return
        except RuntimeError:  # pragma: no cover - it holds its slot already
            pass
        self._executing.add(key)
        assert self.store is not None and self.state is not None
        ts = self.state.tasks.get(key)
        alone = ts is not None and not ts.dependencies
        self._executor.submit(key, run_spec, self.store, alone=alone)

    async def _execute_when_free(self, key: Any, run_spec: Any) -> None:
        try:
            await self.runner.slots.acquire_on_behalf_of(key)
        finally:
            self._slot_waiters -= 1
        self._executing.add(key)
        assert self.store is not None
        self._executor.submit(key, run_spec, self.store)

    def _tasks_done(self) -> None:
        """(In the loop, woken by a task thread.) Feed the finished tasks to the core,
        all in one ``handle`` call.

        When no task is left running, what that produced (``TaskFinished``...) is
        written at once, here, if the socket takes it (``BatchedSend.flush_nowait``):
        nothing else is coming to batch it with, and a task of its own or the batched
        sender's wake-up and schedule point would only delay the round trip.
        """
        self._finished(self._executor.take())

    def _finished(self, batch: list[Done]) -> None:
        scope = self._work_scope
        if scope is not None and scope.cancel_called:
            return  # shut down: nobody to tell (as a cancelled task would not take them)
        batched = self._batched
        if batched is None:
            self._finish_or_report(batch)
            return
        batched.hold()  # (if it is written below, a wake-up of the writer is wasted)
        try:
            self._finish_or_report(batch)
            if not self._executing and not self._closing:
                try:
                    batched.flush_nowait()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the batched sender keeps the error; _read_scheduler sees it
        finally:
            batched.unhold()

    def _finish_or_report(self, batch: list[Done]) -> None:
        """``_finish``, whose error (a bug) ends the worker as one in a task would: a
        callback of ``run_sync_soon`` must not raise."""
        try:
            self._finish(batch)
        except BaseException as exc:
            if self._nursery is None:
                raise
            self._nursery.start_soon(_reraise, exc)

    def _finish(self, batch: list[Done]) -> None:
        store = self.store
        assert store is not None
        now = _now()
        stim = _stimulus("task-finished")
        release = self.runner.release
        events: list[Any] = []
        for done in batch:
            key = done.key
            if done.coroutine is not None:  # ``async def``: runs on the loop, slot kept
                self._start(self._run_async, done)
                continue
            release(key)
            self._executing.discard(key)
            if done.error is not None and not done.rescheduled:
                logger.info("worker %s: task %r failed: %s", self.address, key, done.error[2])
            elif not done.rescheduled:
                store.put(key, done.value)
                if done.push:  # a small value goes ahead of its TaskFinished, to the clients
                    self._send({"op": "value", "key": key, "value": done.value})
            events.append(done.event(stim, now))
        if events:
            self.handle(*events)

    async def _run_async(self, done: Done) -> None:
        """An ``async def`` task, on this worker's loop, with its slot held."""
        assert done.coroutine is not None
        func, args, kwargs = done.coroutine
        done.coroutine = None
        task_context.current_worker.set(self)
        task_context.current_key.set(done.key)
        try:
            value = await func(*args, **kwargs)
        except task_context.Reschedule:
            done.rescheduled = True
        except trio.Cancelled:
            raise
        except BaseException as exc:
            done.fail(exc)
        else:
            done.settle(value)
        done.stop = time.time()
        await self.placer.place_off_loop(done)
        self._executor.deliver(done)


async def _reraise(exc: BaseException) -> None:
    raise exc
