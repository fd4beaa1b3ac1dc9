"""The Scheduler shell: streams in, core events to ``SchedulerState``, effects out.

Everything the scheduler *decides* lives in ``core.scheduler.SchedulerState``; this
module only moves records. A connection says what it is with its first message:

* ``AddWorker`` -- a worker's long-lived stream. Later messages are scheduler events
  from that worker; the ``ToWorker`` effects for it go back on a batched sender. A
  broken stream becomes ``RemoveWorker(expected=False)``.
* ``AddClient`` -- a client's long-lived stream, acknowledged with
  ``{"op": "stream-start"}``. Later messages are client events (``UpdateGraph``,
  ``ClientReleasesKeys`` ...); ``ToClient`` effects go back batched.
  The client ends with ``RemoveClient``; the scheduler answers by closing the stream, so
  the client knows its keys were released. A dropped stream counts as ``RemoveClient``.
* a ``dict`` with an ``"op"`` -- request/response RPC (``scheduler_info``, ``who_has``
  ...), one reply per request, as long as the peer keeps the connection (pooled). A
  request naming ``client`` and ``after`` (messages that client had written on its
  stream) is answered only once those were handled: a request never overtakes them.

``handle`` is synchronous and the effects are routed with ``send_nowait``, so one event
is processed atomically with respect to every other trio task. The shell stamps each
incoming event's ``now`` with its own clock: peers' clocks are not comparable.

Anything malformed closes only the connection it came on, with a logged reason.

Beyond the core, the shell keeps what lives on the scheduler but is not task state:
published datasets (``datasets.DatasetStore``, whose holders want keys through ordinary
client events), uploaded files (``_upload.UploadStore``, installed on each joining worker
before its ``AddWorker`` reaches the core), shipped Python environments and the current
one (``environments.store``), and ``restart`` (cancel every client's keys, then have the
nannies restart their workers, into another environment after every nanny prepared it).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from trioscheduler import wire
from trioscheduler.core import messages as m
from trioscheduler.core import recorder
from trioscheduler.core.scheduler import SchedulerState
from trioscheduler.environments.store import EnvironmentStore
from trioscheduler.http import format_dashboard_link, resolve_dashboard_address
from trioscheduler.http.task_stream import TaskStream
from trioscheduler.server import event_log, recovery
from trioscheduler.server import plugins as _plugins
from trioscheduler.server.client_stream import serve_client
from trioscheduler.server.coordination import CoordinationHost
from trioscheduler.server.datasets import DatasetStore
from trioscheduler.server.diagnostics import HANDLERS as _DIAGNOSTICS_HANDLERS
from trioscheduler.server.diagnostics import Diagnostics
from trioscheduler.server.event_log import EventLogWriter
from trioscheduler.server.peers import WAITING_OPS, Peer, ProtocolViolation, unless_peer_leaves
from trioscheduler.server.preload import preloads
from trioscheduler.server.scheduler_config import amm_config
from trioscheduler.server.scheduler_config import no_workers_timeout as no_workers_timeout_setting
from trioscheduler.server.scheduler_ops import HANDLERS as _OPS_HANDLERS
from trioscheduler.server.uploads import UploadStore
from trioscheduler.wire import local_alias
from trioscheduler.wire.security import Security, connect_args, default_scheme, listen_args
from trioscheduler.wire.security import resolve as resolve_security

__all__ = ["FIRE_AND_FORGET", "Scheduler"]

logger = logging.getLogger("trioscheduler.scheduler")

FIRE_AND_FORGET = m.FIRE_AND_FORGET
"""The client id that keeps ``fire_and_forget`` keys wanted until they are done."""

_CLOSE_FLUSH_TIMEOUT = 5.0  # seconds an orderly close gives the workers' CloseWorker to go out
_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_WORKER_EVENTS = frozenset(m.SCHEDULER_EVENTS) - {
    m.AddClient, m.RemoveClient, m.UpdateGraph, m.UpdateData, m.ClientDesiresKeys,
    m.ClientReleasesKeys, m.CancelKeys, m.CancelAll, m.RetryKeys, m.Tick, m.AddWorker, m.DropReplicas,
    m.Recovered, m.ActiveMemoryManager,
}  # fmt: skip
_STREAMED = (m.TaskFinished, m.TaskErred, m.WorkerHeartbeat)  # what the task stream reads
_NO_KEY: Any = object()
_NO_VALUES: dict[Any, Any] = {}  # (never written to)


_aliases = itertools.count(1)


class Scheduler:
    """``async with Scheduler(address) as s``: serve workers and clients until exit.

    ``record`` (a path) is written with every event handed to the core: a
    ``core.recorder`` header, then the dumped events (``server/event_log.py``'s framed
    file), so ``core.recorder.replay(event_log.load_log(path))`` rebuilds the state.

    ``recover_from`` (a path) is the same log, kept across restarts: a scheduler started
    with an existing log replays it, tells the core it ``Recovered`` (workers and
    clients then have ``recovery_grace`` seconds to come back), and appends to it.
    ``log_fsync_interval`` bounds what a power loss can take (see ``event_log``;
    docs/recovery.md says what survives).

    ``dashboard_address`` (``":8787"``, ``"127.0.0.1:0"``, a port; None: no dashboard,
    the default here) serves the dashboard (``trioscheduler.http``) from this process;
    it needs the ``dashboard`` extra. No host means this scheduler's own host.

    Leaving the block tells every connected worker to close (and its nanny with it), as
    dask's ``Scheduler.close`` does; ``close_workers=False`` leaves them redialling for
    their ``death_timeout``, for a scheduler that is restarted on purpose (the default
    with ``recover_from``). A scheduler
    that crashes tells nobody: its workers redial and rejoin one that comes back.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        worker_timeout: float = 30.0,
        record: str | Path | None = None,
        recover_from: str | Path | None = None,
        log_fsync_interval: float | None = 1.0,
        recovery_grace: float = 60.0,
        validate: bool = False,
        tick_interval: float = 0.1,
        batch_interval: float = 0.002,
        allowed_failures: int = 3,
        steal: bool = True,
        idle_timeout: float | None = None,
        preload: Sequence[str] = (),
        security: Security | bool | None = None,
        no_workers_timeout: float | str | None = "config",
        dashboard_address: str | int | None = None,
        close_workers: bool | None = None,
    ) -> None:
        self.security = resolve_security(security)
        # None: close them, unless the scheduler keeps a log to come back from
        self.close_workers = recover_from is None if close_workers is None else close_workers
        self._workers_told = False  # an orderly close sent them CloseWorker
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be a positive number of seconds, got {idle_timeout!r}")
        # default: port 8786 on loopback, tls:// once certificates are given
        self._requested_address = address or f"{default_scheme(self.security)}://127.0.0.1:8786"
        self.idle_timeout = idle_timeout
        self.preload = list(preload)
        self._idle_since: float | None = None
        self._finished = trio.Event()  # set when the scheduler wants to stop (idle)
        # raises naming the extra if one was asked for and it is missing
        self._dashboard_request = resolve_dashboard_address(dashboard_address)
        self.dashboard: Any = None  # http.app.Dashboard while serving
        self.task_stream = TaskStream()
        amm_start, amm_interval = amm_config()
        self._core_kwargs: dict[str, Any] = {
            "worker_timeout": worker_timeout,
            "allowed_failures": allowed_failures,
            "steal": steal,
            "validate": validate,
            "no_workers_timeout": no_workers_timeout_setting(no_workers_timeout),
            # the Active Memory Manager, on by default as dask's (its config is honoured)
            "amm_interval": amm_interval if amm_start else None,
        }
        self.state = SchedulerState(**self._core_kwargs)
        self.tick_interval = tick_interval
        self.batch_interval = batch_interval
        if record is not None and recover_from is not None:
            raise ValueError("pass record= or recover_from=, not both (recover_from also records)")
        if log_fsync_interval is not None and log_fsync_interval < 0:
            raise ValueError(f"log_fsync_interval must be >= 0 or None, not {log_fsync_interval!r}")
        if not recovery_grace >= 0:
            raise ValueError(f"recovery_grace must be >= 0 seconds, not {recovery_grace!r}")
        self._record_path = Path(record) if record is not None else None
        self.recover_from = Path(recover_from) if recover_from is not None else None
        self.log_fsync_interval = log_fsync_interval
        self.recovery_grace = recovery_grace
        self.recovered = False  # started from an existing log
        self._log: EventLogWriter | None = None
        self._frozen = False  # stopping with recover_from: the state stays the log's
        self._workers: dict[str, Peer] = {}  # address -> batched sender
        self._clients: dict[str, Peer] = {}  # client id -> batched sender
        self._workers_changed = trio.Event()
        self._counter = itertools.count()
        self.datasets = DatasetStore(self._feed_client_event)
        self.uploads = UploadStore()
        self.coordination = CoordinationHost(self._feed_client_event, validate=validate)
        self.environments = EnvironmentStore()  # shipped environments, and the current one
        self._env_lock = trio.Lock()  # one chunk at a time into the store
        self.diagnostics = Diagnostics(self)  # events, metadata, task stream, metrics
        self.plugins = _plugins.SchedulerPlugins(self)
        self._pool: wire.ConnectionPool | None = None
        self._stack: AsyncExitStack | None = None
        self._nursery: trio.Nursery | None = None
        self.address: str = ""
        self.inproc_address: str | None = None  # the same service for this trio run
        self._values: dict[Any, Any] = _NO_VALUES  # small values _feed_finished routes
        # While a client's batch is handled: the workers' senders it queued messages on,
        # held (no writer wake-up: ``_flush_client_work`` writes them); else None.
        self._held: list[Peer] | None = None
        self._feeding = 0  # _feed calls under way (``client_stream``: not to be re-entered)

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Scheduler:
        try:
            await self._start()
        except BaseExceptionGroup as group:
            # A start-up failure (address in use...) surfaces as itself, not wrapped in
            # the groups of the nurseries it passed through.
            raise wire.sole_error(group) from None
        return self

    async def _start(self) -> None:
        async with AsyncExitStack() as stack:
            if self._record_path is not None or self.recover_from is not None:
                self._open_log(stack)
            stack.callback(self.environments.close)
            self._pool = await stack.enter_async_context(
                wire.ConnectionPool(
                    role="scheduler",
                    info={"type": "Scheduler"},
                    **connect_args(self.security, "scheduler"),
                )
            )
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            # Runs after the listener closed, before the nursery exits (LIFO).
            stack.callback(self._nursery.cancel_scope.cancel)
            if self._log is not None and self.log_fsync_interval:
                self._nursery.start_soon(recovery.fsync_loop, self._log, self.log_fsync_interval)
            if self.recovered:  # before anyone can connect: they all count as coming back
                self._feed(
                    m.Recovered(
                        self._stimulus("recovered"), trio.current_time(), self.recovery_grace,
                        [FIRE_AND_FORGET, *self.datasets.holders()],
                    )
                )
            listener = await stack.enter_async_context(
                wire.listen(
                    self._requested_address,
                    self._on_connection,
                    role="scheduler",
                    info={"type": "Scheduler"},
                    peer_speaks_first=True,
                    **listen_args(self.security, "scheduler"),
                )
            )
            self.address = listener.address
            if not self.address.startswith("inproc://"):
                # The same service under an inproc:// name, for a client in this very
                # trio run (a sync Client beside its LocalCluster): no sockets, no
                # serialization between them. See ``wire.local_alias``.
                alias = await stack.enter_async_context(
                    wire.listen(
                        f"inproc://scheduler-{os.getpid()}-{next(_aliases)}",
                        self._on_connection,
                        role="scheduler",
                        info={"type": "Scheduler"},
                    )
                )
                self.inproc_address = alias.address
                local_alias.register(self.address, alias.address)
                stack.callback(local_alias.unregister, self.address)
            self._feed(
                m.AddClient(self._stimulus("scheduler-start"), trio.current_time(), FIRE_AND_FORGET)
            )
            self._nursery.start_soon(self._ticker)
            if self._dashboard_request is not None:
                await self._start_dashboard(self._dashboard_request)
            await stack.enter_async_context(preloads(self.preload, self))
            logger.info("scheduler listening at %s", self.address)
            self._stack = stack.pop_all()

    async def _start_dashboard(self, requested: str | int) -> None:
        from trioscheduler.http import parse_dashboard_address
        from trioscheduler.http.app import Dashboard

        scheme, host, _ = wire.parse_address(self.address)
        default_host = host if scheme == "tcp" and host else "127.0.0.1"
        bind_host, port = parse_dashboard_address(requested, default_host)
        dashboard = Dashboard(self)
        assert self._nursery is not None
        await self._nursery.start(dashboard.serve, bind_host, port)
        self.dashboard = dashboard
        logger.info("dashboard at %s", self.dashboard_link)

    @property
    def dashboard_link(self) -> str | None:
        """``http://host:port/status``, or None without a dashboard."""
        if self.dashboard is None:
            return None
        _, host, _ = wire.parse_address(self.address)
        return format_dashboard_link(self.dashboard.host, self.dashboard.port, host or "")

    async def worker_logs(self, address: str) -> list[str]:
        """A worker's recent log lines (its data server's ``get_logs``), for the dashboard."""
        assert self._pool is not None
        try:
            with trio.fail_after(10):
                async with self._pool.connect(address) as stream:
                    await stream.send({"op": "get_logs"})
                    reply: dict[str, Any] = await stream.receive()
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, trio.EndOfChannel) as exc:
            return [f"(could not reach worker {address}: {exc!r})"]
        if reply.get("status") != "OK":
            return [f"(worker {address} answered: {reply.get('text')})"]
        return [str(line) for line in reply.get("logs", [])]

    def services(self) -> dict[str, Any]:
        """dask's ``services``: ``{"dashboard": port}`` while a dashboard serves, and its host."""
        if self.dashboard is None:
            return {}
        return {"dashboard": self.dashboard.port, "dashboard_host": self.dashboard.host}

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        assert self._stack is not None
        if self.recover_from is not None:
            # Stopped in order, the scheduler comes back as it was when asked to stop:
            # from now on, nothing reaches the core (and no effect leaves) unrecorded.
            self._close_log()
            self._frozen = True
        # Clients learn whether to wait for a restart (a scheduler with a log) or give up.
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            for peer in list(self._clients.values()):
                try:
                    peer.send({"op": "scheduler-closing", "reconnect": self.recover_from is not None})
                    await peer.batched.flush()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        try:
            with trio.CancelScope(shield=True):
                await self.plugins.close_all()
                if self.close_workers:
                    await self._close_workers()
            # The body's own exception is not fed through our nursery: it propagates
            # unwrapped once everything here is closed ...
            await self._stack.aclose()
        except BaseException as closing_error:
            # ... and is not replaced by a cancellation of the closing from outside.
            if exc is None or not wire.only_cancelled(closing_error):
                raise
        finally:
            self.dashboard = None
            logger.info("scheduler at %s closed", self.address)

    async def close(self) -> None:
        """dask's ``Scheduler.close``: tell the workers to close (unless ``close_workers``
        is off), then ``finished()`` returns, so whoever holds the block leaves it."""
        if self.close_workers:
            await self._close_workers()
        self._finished.set()

    async def _close_workers(self) -> None:
        """``CloseWorker`` to every worker, written out before the streams close (once)."""
        if self._workers_told:
            return
        self._workers_told = True
        for addr in list(self._workers):
            self._send(self._workers, addr, m.CloseWorker(addr, "scheduler-close"))
        with trio.move_on_after(_CLOSE_FLUSH_TIMEOUT):
            await self._flush_workers()

    # -- the core ------------------------------------------------------------------

    def _stimulus(self, kind: str) -> str:
        return f"{kind}-{next(self._counter)}"

    def _feed(self, *events: Any) -> None:
        """Hand events to the core and carry out its effects (synchronously).

        With a log, the events reach the kernel (one frame, one write) before the core
        sees them, so nothing they cause can leave the process unrecorded."""
        if self._frozen:
            return
        if self._log is not None:
            self._log.record(events)
        self._feeding += 1
        try:
            effects = self.state.handle(*events)
            if effects:
                self._route(effects)
            if self.plugins.active:
                self.plugins.after(events)
        finally:
            self._feeding -= 1

    def _open_log(self, stack: AsyncExitStack) -> None:
        """Start the log, or (``recover_from`` an existing one) replay it first."""
        path = self._record_path or self.recover_from
        assert path is not None
        if self.recover_from is not None and path.exists() and path.stat().st_size > 0:
            contents = event_log.read_log(path)
            if contents.header is not None:
                self.state, self._core_kwargs = recovery.replay(path, contents, self._core_kwargs)
                self.datasets.restore(contents.shell)
                self._log = EventLogWriter.append_to(path, contents, self.log_fsync_interval)
                self.recovered = True
        if self._log is None:
            header = recorder.header("scheduler", self._core_kwargs)
            self._log = EventLogWriter.create(path, header, self.log_fsync_interval)
        stack.callback(self._close_log)
        if self.recover_from is not None:  # published datasets are kept in the log too
            self.datasets.journal = self._log_shell_record

    def _log_shell_record(self, record: list[Any]) -> None:
        if self._log is not None:
            self._log.append([[event_log.SHELL_TAG, *record]])

    def _close_log(self) -> None:
        log, self._log = self._log, None
        if log is not None:
            log.close()

    def _feed_finished(self, finished: list[Any], values: dict[Any, Any]) -> None:
        """Feed a run of one worker's events (``TaskFinished``...) in one ``handle`` call
        (one pass of the shell and the core per run, not per event); clients told a key
        is in memory also get its value from ``values``.

        A worker sends a small result (``_executor.pushable``) as ``{"op": "value"}``
        just before its ``TaskFinished``, in the same batch, so that ``future.result()``
        needs no ``who_has`` and no ``get_data`` round trip; nothing keeps it here
        afterwards.
        """
        self._values = values
        try:
            self._feed(*finished)
        finally:
            self._values = _NO_VALUES

    def _feed_client_event(self, event_type: Any, client: str, *fields: Any) -> None:
        """One client event made up by the shell itself (datasets, restart)."""
        self._feed(
            event_type(self._stimulus(f"scheduler-{client}"), trio.current_time(), client, *fields)
        )

    def _route(self, effects: list[Any]) -> None:
        for eff in effects:
            t = type(eff)
            if t is m.ToWorker:
                held = self._held
                if held is not None:
                    peer = self._workers.get(eff.worker)
                    if peer is not None and not peer.batched.holding:
                        peer.batched.hold()
                        held.append(peer)
                self._send(self._workers, eff.worker, eff.msg)
            elif t is m.ToClient:
                msg = eff.msg
                if self._values and type(msg) is m.KeyInMemory:
                    value = self._values.get(msg.key, _NO_KEY)
                    if value is not _NO_KEY:
                        self._send(
                            self._clients, eff.client, {"op": "value", "key": msg.key, "value": value}
                        )
                self._send(self._clients, eff.client, msg)
            elif t is m.CloseWorker:
                self._send(self._workers, eff.worker, eff)
            elif t is m.Log:
                logger.log(_LOG_LEVELS.get(eff.level, logging.ERROR), "%s", eff.text)
            else:
                logger.error("unknown effect from the scheduler core: %r", eff)

    @staticmethod
    def _send(table: dict[str, Peer], peer: str, msg: Any) -> None:
        out = table.get(peer)
        if out is None:
            logger.debug("dropping %r for %s: not connected", type(msg).__name__, peer)
            return
        try:
            out.send(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            logger.debug("dropping %r for %s: stream closed", type(msg).__name__, peer)

    async def _flush_client_work(self, held: list[Peer]) -> None:
        """``_flush_workers`` for what a client's batch queued (``_held``): each of those
        senders is written now and released (its writer's wake-up would find nothing)."""
        try:
            for peer in held:
                try:
                    await peer.batched.flush()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the worker's stream is going: its serving task handles that
        finally:
            for peer in held:
                peer.batched.unhold()

    async def _flush_workers(self) -> None:
        """Write what is queued for every worker now (closing)."""
        for peer in list(self._workers.values()):
            if peer.batched.pending:
                try:
                    await peer.batched.flush()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the worker's stream is going: its serving task handles that

    def _notify_workers_changed(self) -> None:
        self.coordination.workers_changed(self.state.workers)  # leases of the gone return
        self._workers_changed.set()
        self._workers_changed = trio.Event()

    async def _ticker(self) -> None:
        while True:
            await trio.sleep(self.tick_interval)
            before = len(self.state.workers)
            self._feed(m.Tick(self._stimulus("tick"), trio.current_time()))
            if len(self.state.workers) != before:  # the core timed a worker out
                self._notify_workers_changed()
            if self.idle_timeout is not None:
                self._check_idle(trio.current_time(), self.idle_timeout)

    def _check_idle(self, now: float, timeout: float) -> None:
        if self.state.busy() or self._idle_since is None:
            self._idle_since = now
        elif now - self._idle_since >= timeout and not self._finished.is_set():
            logger.info("scheduler idle for %.0f s (idle_timeout): closing", now - self._idle_since)
            self._finished.set()

    async def finished(self) -> None:
        """Until the scheduler wants to stop (``idle_timeout`` reached, ``close()``):
        whoever holds it open (the ``trioscheduler scheduler`` command) then leaves its block."""
        await self._finished.wait()

    # -- connections ---------------------------------------------------------------

    async def _on_connection(self, stream: Any) -> None:
        peer = getattr(stream, "peer_address", None) or "?"
        try:
            try:
                first = await stream.receive()
            except trio.EndOfChannel:
                return
            t = type(first)
            if t is m.AddWorker:
                await self._serve_worker(stream, first)
            elif t is m.AddClient:
                await self._serve_client(stream, first)
            elif t is dict and "op" in first:
                await self._serve_rpc(stream, first)
            else:
                raise ProtocolViolation(f"unexpected first message {first!r:.200}")
        except ProtocolViolation as exc:
            logger.warning("closing connection from %s: %s", peer, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.EndOfChannel):
            pass
        except Exception:
            logger.exception("closing connection from %s after an error", peer)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _serve_worker(self, stream: Any, add: m.AddWorker) -> None:
        addr = add.worker
        if addr in self._workers:
            raise ProtocolViolation(f"a worker at {addr} is already connected")
        removed = False
        reason = "stream closed"
        await self._install_uploads(addr)  # before any task can reach the worker
        await self.plugins.joining(addr, add.nanny)
        async with wire.open_batched(stream, self.batch_interval) as batched:
            self._workers[addr] = Peer(batched)
            # Small results (``{"op": "value"}``) whose TaskFinished follows in the same
            # batch; one whose TaskFinished did not come (the worker dropped the result)
            # is forgotten with the batch.
            values: dict[Any, Any] = {}
            try:
                add.now = trio.current_time()
                self._feed(add)
                self._notify_workers_changed()
                while not removed:
                    try:
                        batch = await stream.receive_batch()
                    except trio.EndOfChannel:
                        break
                    log = self._log
                    if log is not None:  # the batch's frames in one write, before its effects
                        log.hold()  # leave (they go at the next schedule point, after this)
                    run: list[Any] = []  # consecutive events: fed in one handle call
                    for msg in batch:
                        t = type(msg)
                        if t is dict:
                            if msg.get("op") == "value":
                                values[msg["key"]] = msg["value"]
                                continue
                            if run:  # (reports are taken in order with the events)
                                self._feed_run(run, values)
                                run = []
                            if msg.get("op") == "plugin-error":
                                self.plugins.worker_reported(addr, msg)
                                continue
                            if self.diagnostics.worker_message(addr, msg):
                                continue
                        if t not in _WORKER_EVENTS or msg.worker != addr:
                            if run:
                                self._feed_run(run, values)
                            reason = f"protocol violation: {msg!r:.200}"
                            raise ProtocolViolation(f"worker {addr} sent {msg!r:.200}")
                        msg.now = trio.current_time()
                        self.diagnostics.observe(msg)
                        run.append(msg)
                        if t is m.RemoveWorker:
                            removed = True
                            break
                    if run:
                        self._feed_run(run, values)
                    values.clear()
                    if log is not None:
                        log.release()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                reason = f"connection lost: {exc!r}"
            finally:
                if self._log is not None:
                    self._log.release()  # (a batch cut short by an error)
                del self._workers[addr]
                self.diagnostics.worker_left()
                if not removed and addr in self.state.workers:
                    self._feed(
                        m.RemoveWorker(
                            self._stimulus("worker-stream-closed"),
                            trio.current_time(),
                            addr,
                            expected=False,
                            reason=reason,
                        )
                    )
                self._notify_workers_changed()

    def _feed_run(self, run: list[Any], values: dict[Any, Any]) -> None:
        self._feed_finished(run, values)
        task_stream = self.task_stream
        if task_stream.wanted:
            for msg in run:
                if type(msg) in _STREAMED:
                    task_stream.observe(msg)

    async def _serve_client(self, stream: Any, add: m.AddClient) -> None:
        await serve_client(self, stream, add)

    async def _serve_rpc(self, stream: Any, request: dict[str, Any]) -> None:
        while True:
            client, after = request.get("client"), request.get("after")
            if isinstance(client, str) and isinstance(after, int):
                peer = self._clients.get(client)
                if peer is not None:  # answer after what the client sent before asking
                    await peer.caught_up(after)
            op = request.get("op")
            handler = self._rpc_handlers.get(op) if isinstance(op, str) else None
            if handler is None:
                reply: dict[str, Any] = {"status": "error", "text": f"unknown operation {op!r}"}
            else:
                try:
                    if op in WAITING_OPS:
                        result = await unless_peer_leaves(stream, handler(self, request))
                    else:
                        result = await handler(self, request)
                    reply = {"status": "OK", "result": result}
                except trio.EndOfChannel:
                    return  # the requester left while waiting
                except Exception as exc:
                    logger.warning("rpc %r failed: %r", op, exc)
                    reply = {
                        "status": "error",
                        "text": f"{type(exc).__name__}: {exc}",
                        "type": type(exc).__name__,  # the client re-raises builtin types
                    }
            await stream.send(reply)
            try:
                request = await stream.receive()
            except trio.EndOfChannel:
                return
            if type(request) is not dict:
                raise ProtocolViolation(f"rpc request is not a dict: {request!r:.200}")

    # -- what RPC operations (``server/scheduler_ops.py``) use -----------------------

    def _worker_info(self, addr: str, ws: Any) -> dict[str, Any]:
        return {
            "type": "Worker",
            "id": getattr(ws, "name", None),
            "name": getattr(ws, "name", None),
            "nthreads": ws.nthreads,
            "memory_limit": getattr(ws, "memory_limit", 0),
            "resources": dict(getattr(ws, "resources", None) or {}),
            "status": getattr(ws, "status", "running"),
            "nanny": getattr(ws, "nanny", None),
            "metrics": self.diagnostics.metrics.get(addr, {}),  # the latest heartbeat's
            "executing": self.diagnostics.metrics.get(addr, {}).get("executing", 0),
            "processing": len(getattr(ws, "processing", ())),
            "nbytes": getattr(ws, "nbytes", 0),
        }

    async def _run_on_worker(self, addr: str, payload: bytes, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
        """One ``run`` request to a worker's data server; a failure becomes an error reply."""
        assert self._pool is not None
        try:
            with trio.fail_after(timeout):
                async with self._pool.connect(addr) as stream:
                    await stream.send({"op": "run", "function": payload})
                    reply: dict[str, Any] = await stream.receive()
                    return reply
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, trio.EndOfChannel) as exc:
            return {"status": "error", "text": f"could not reach worker {addr}: {exc!r}"}

    async def _install_uploads(self, addr: str) -> None:
        """Install every uploaded file on a joining worker (errors are logged)."""
        for name, payload in self.uploads.payloads():
            reply = await self._run_on_worker(addr, payload, 30.0)
            if reply.get("status") != "OK":
                logger.error(
                    "installing uploaded file %s on worker %s failed: %s",
                    name,
                    addr,
                    reply.get("text"),
                )

    def retire_worker(self, addr: str) -> None:
        """Close ``addr`` gracefully: its unique data is copied to other workers first
        (the core's ``RetireWorker``); a worker nobody could take data from keeps running."""
        self._feed(m.RetireWorker(self._stimulus("retire"), trio.current_time(), addr))

    _rpc_handlers: dict[str, Callable[[Scheduler, dict[str, Any]], Any]] = {
        **_OPS_HANDLERS,  # identity, who_has, datasets, upload_file, restart... (scheduler_ops.py)
        **_DIAGNOSTICS_HANDLERS,  # logs, events, metadata, retire/replicate... (diagnostics.py)
        **_plugins.RPC_HANDLERS,
    }


@asynccontextmanager
async def open_scheduler(
    address: str = "tcp://127.0.0.1:8786", **kwargs: Any
) -> AsyncIterator[Scheduler]:
    """``async with open_scheduler(...) as s`` -- the same as ``async with Scheduler(...)``."""
    async with Scheduler(address, **kwargs) as s:
        yield s
