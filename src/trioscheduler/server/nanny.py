"""The nanny: keeps one worker alive in a child process.

The child runs ``trioscheduler worker ADDRESS --no-nanny``, started one of two ways
(``start_method``; default: the ``TRIOSCHEDULER_WORKER_START_METHOD`` environment
variable, else ``"auto"``):

* ``"spawn"``: ``python -m trioscheduler worker ...``, a fresh interpreter that imports
  the worker on its own (about 0.3 s here, and again on every restart).
* ``"fork"``: a fork of this process, which has imported all of that already
  (``_forked_worker``). The fork is made from a new thread that is not inside
  ``trio.run``, so the child, where that thread is the only one, runs its own
  ``trio.run`` in it. ``"auto"`` forks where that is safe (see ``fork_unsafe``) and
  spawns otherwise.

Either way the child is a separate process: a task that corrupts its interpreter harms
only its worker. The nanny restarts the child when it dies, or kills and restarts it when
its memory passes ``terminate`` (0.95) of ``memory_limit``, and logs why. The scheduler
learns of the loss the ordinary way: the worker's stream breaks.

Two pipes tie the child to the nanny. The child announces its address, and later that
it is closing on purpose (the scheduler asked it to), on ``--ready-fd``; a child that
exits without saying so crashed and is restarted. The child also watches its stdin, which
the nanny holds open: if the nanny dies, even by SIGKILL, the child sees EOF and exits.
Leaving the nanny's ``async with`` terminates the child (SIGTERM, then SIGKILL after
``close_timeout``) and reaps it, whatever the reason for leaving.

The nanny serves a few requests on its own address (``nanny.address``, announced to the
scheduler as ``AddWorker.nanny``) so that a scheduler or client can restart workers:
``{"op": "restart", "reason": ...}`` -> ``{"status": "OK", "worker": new_address}``,
``{"op": "kill"}``, ``{"op": "status"}`` -> ``{"status": "OK", "worker", "pid",
"restarts", "environment"}``, and ``{"op": "env_prepare", "id": sha256}`` (the first phase
of a restart into a shipped environment).

Before each start the nanny asks the scheduler which environment its workers run in
(``trioscheduler.environments``): the base one, this nanny's own interpreter, or a
shipped environment, which the child then runs in as ``<env>/bin/python -P -m
trioscheduler worker ...``, always spawned. ``python=PATH`` runs the base environment's
worker under another interpreter (spawned, after a preflight) and re-bases shipped venvs
onto PATH's base interpreter.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import psutil
import trio

from trioscheduler import wire
from trioscheduler.environments.evict import Limits
from trioscheduler.environments.keeper import EnvironmentKeeper
from trioscheduler.environments.launch import LaunchSpec, resolve_python
from trioscheduler.errors import TrioSchedulerError
from trioscheduler.server import memory
from trioscheduler.server.fork import (
    WORKER_ENVIRON,
    _fork_hostile_library,
    _fork_worker,
    _ForkedProcess,
    _ForkUnsafe,
    _own_rss,
    fork_supported,
)
from trioscheduler.server.lifecycle import RunsInAsyncWith
from trioscheduler.server.plugins import NannyPlugins
from trioscheduler.server.preload import preloads
from trioscheduler.wire.address import default_host, tcp_address
from trioscheduler.wire.security import Security, connect_args, listen_args, write_role_files
from trioscheduler.wire.security import resolve as resolve_security

logger = logging.getLogger("trioscheduler.nanny")

_SCRATCH_PREFIX = "trioscheduler-nanny-"
_LOCK_FILE = ".lock"  # flock()ed while the nanny lives
_TLS_DIR = ".tls"  # the worker certificate for the child, if any


def claim_scratch(base: str) -> tuple[str, int]:
    """A new scratch directory in ``base``, locked (``flock``) for as long as the returned
    fd is open. Directories of nannies that died without cleaning up (SIGKILL) are
    removed first: their lock is free (the kernel released it with the process)."""
    remove_stale_scratch(base)
    path = tempfile.mkdtemp(prefix=_SCRATCH_PREFIX, dir=base)
    fd = os.open(os.path.join(path, _LOCK_FILE), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return path, fd


def remove_stale_scratch(base: str) -> list[str]:
    """Remove the scratch directories in ``base`` whose nanny is gone; returns them."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(_SCRATCH_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            fd = os.open(os.path.join(entry.path, _LOCK_FILE), os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue  # no lock file: not ours to judge (being created, or another version)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live nanny holds it
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
        finally:
            os.close(fd)
    if removed:
        logger.info("nanny: removed %d stale scratch director%s of dead nannies in %s",
                    len(removed), "y" if len(removed) == 1 else "ies", base)  # fmt: skip
    return removed


#: A nanny restarting its worker this many times within ``RESTART_WINDOW`` seconds waits
#: before the next restart: 0.5 s, doubling each time, at most ``RESTART_BACKOFF_MAX``.
RESTART_BURST = 5
RESTART_WINDOW = 60.0
RESTART_BACKOFF_MAX = 30.0

# Python 3.12+ warns at every fork of a process with threads; _fork is where the hazards
# that warning names are met (see the notes above _ForkUnsafe).
warnings.filterwarnings(
    "ignore",
    message=r".*use of fork\(\) may lead to deadlocks",
    category=DeprecationWarning,
    module=__name__,
)


START_METHODS = ("auto", "fork", "spawn")
START_METHOD_ENV = "TRIOSCHEDULER_WORKER_START_METHOD"
FORK_RSS_FRACTION = 0.1

"""``"auto"`` spawns when this process's RSS is above this fraction of the worker's
memory limit: a forked child starts with the parent's resident pages counted in its own
RSS, which the memory policy and the terminate threshold judge."""


class WorkerStartError(TrioSchedulerError):
    """The worker process exited or stayed silent before it joined the scheduler."""


def default_start_method() -> str:
    """``$TRIOSCHEDULER_WORKER_START_METHOD`` or ``"auto"``."""
    return os.environ.get(START_METHOD_ENV, "").strip().lower() or "auto"


def _check_start_method(method: str) -> str:
    if method not in START_METHODS:
        raise ValueError(f"start_method must be one of {START_METHODS}, got {method!r}")
    if method == "fork" and not fork_supported():
        raise ValueError(
            "start_method='fork' needs Linux with pidfd_open (Python 3.9+, kernel 5.3+)"
        )
    return method


class Nanny(RunsInAsyncWith):
    """``async with Nanny(scheduler_address, nthreads=2) as n: ...``; ``n.worker_address``.

    ``memory_limit`` is resolved here (``"auto"`` shares system memory among ``nworkers``)
    and passed to the child in bytes, so both judge memory against the same number.
    ``start_method`` (``"auto"``, ``"fork"``, ``"spawn"``; see the module docstring) is
    applied at every (re)start; ``started_by`` tells how the current child began.
    """

    def __init__(
        self,
        scheduler_address: str,
        *,
        nthreads: int = 1,
        memory_limit: str | float | None = "auto",
        nworkers: int = 1,
        resources: dict[str, float] | None = None,
        name: str | None = None,
        local_directory: str | None = None,
        host: str | None = None,
        terminate_fraction: float | None = memory.TERMINATE,
        monitor_interval: float = 0.25,
        startup_timeout: float = 60.0,
        close_timeout: float = 5.0,
        log_level: str = "info",
        env: dict[str, str] | None = None,
        start_method: str | None = None,
        port: int = 0,
        worker_port: int = 0,
        preload: Sequence[str] = (),
        preload_nanny: Sequence[str] = (),
        lifetime: float | None = None,
        lifetime_stagger: float = 0.0,
        lifetime_restart: bool = False,
        death_timeout: float | None = None,
        worker_listen_address: str | None = None,
        worker_contact_address: str | None = None,
        security: Security | bool | None = None,
        env_cache_dir: str | None = None,
        env_cache_max_count: int | str | None = "default",
        env_cache_max_size: int | str | None = "default",
        python: str | None = None,
        record: str | os.PathLike[str] | None = None,
    ) -> None:
        self.security = resolve_security(security)
        self.record = record  # the worker's event log (``Worker(record=)``), passed on
        self._tls_argv: list[str] = []  # the worker certificate, as files the child reads
        self.scheduler_address = scheduler_address
        self.nthreads = nthreads
        self.memory_limit = memory.parse_memory_limit(memory_limit, nworkers=nworkers)
        self.resources = dict(resources or {})
        self.name = name
        self.local_directory = local_directory
        self.host = host
        self.terminate_fraction = terminate_fraction
        self.monitor_interval = monitor_interval
        self.startup_timeout = startup_timeout
        self.close_timeout = close_timeout
        self.log_level = log_level
        self.env = env
        self.start_method = _check_start_method(start_method or default_start_method())
        # The worker's interpreter (None: ours; always spawned otherwise), which shipped
        # venvs are re-based onto too.
        self.python = resolve_python(python)
        # Shipped environments; env_cache_dir (default: environments.cache) is shared by
        # this user's nannies on the host, and bounded (environments.evict).
        self.environments = EnvironmentKeeper(
            scheduler_address,
            env_cache_dir,
            connect_args(self.security, "nanny"),
            python=self.python,
            limits=Limits.resolve(env_cache_max_count, env_cache_max_size),
        )
        self.port = port  # where the nanny listens (0: any free port)
        # passed on to each worker process (see ``server/worker_process.py``)
        self.worker_port = worker_port
        self.preload = list(preload)
        self.preload_nanny = list(preload_nanny)
        self.lifetime = lifetime
        self.lifetime_stagger = lifetime_stagger
        self.lifetime_restart = lifetime_restart
        self.death_timeout = death_timeout
        self.worker_listen_address = worker_listen_address
        self.worker_contact_address = worker_contact_address

        self.worker_address: str | None = None
        self.address: str | None = None  # where the nanny takes requests
        self.pid: int | None = None
        self.restarts = 0
        self.started_by: str | None = None  # "fork" or "spawn": how the current child began
        self.status = "created"  # created -> running -> closing -> closed
        self.close_reason = ""
        self._process: trio.Process | _ForkedProcess | None = None
        self._kill_reason: str | None = None
        self._sigtermed: int | None = None  # the pid we sent SIGTERM to
        self._closing = False
        self._closing_ev = trio.Event()  # set with _closing: ends a restart back-off
        self._restart_times: deque[float] = deque()
        self._closed = trio.Event()
        self._started = trio.Event()  # a (re)started child announced its address
        self._life: AbstractAsyncContextManager[Any] | None = None  # _run(), while open
        self._nursery: trio.Nursery | None = None
        self._scratch = ""  # our directory for the children's spill files
        self.plugins = NannyPlugins(self)

    def __repr__(self) -> str:
        return f"<Nanny {self.worker_address or '(no worker)'} pid={self.pid} {self.status}>"

    # ----------------------------------------------------------------------------------

    async def finished(self) -> None:
        """Wait until the nanny stopped (closed, or its worker closed on purpose)."""
        await self._closed.wait()

    async def close(self) -> None:
        """Terminate the worker and stop looking after it."""
        self._closing = True
        self._closing_ev.set()
        await self._terminate(graceful=True)
        await self._closed.wait()

    async def kill(self, reason: str = "killed on request") -> None:
        """Kill the worker process now (SIGKILL); the nanny restarts it."""
        self._kill_reason = reason
        proc = self._process
        if proc is not None and proc.returncode is None:
            proc.kill()

    async def restart(self, reason: str = "restart requested") -> str:
        """Kill the worker, wait for the new one (``startup_timeout``); returns its address."""
        self._started = trio.Event()
        await self.kill(reason)
        with trio.fail_after(self.startup_timeout + self.close_timeout):
            await self._started.wait()
        assert self.worker_address is not None
        return self.worker_address

    @asynccontextmanager
    async def _run(self) -> AsyncIterator[Nanny]:
        listen_at = self._listen_address()
        base = self.local_directory or tempfile.gettempdir()
        os.makedirs(base, exist_ok=True)
        self._scratch, lock_fd = claim_scratch(base)
        try:
            if self.security is not None and self.security.enabled:
                tls_dir = os.path.join(self._scratch, _TLS_DIR)  # inside our 0700 scratch
                os.mkdir(tls_dir, 0o700)
                self._tls_argv = write_role_files(self.security, "worker", tls_dir)
            async with wire.background_nursery() as nursery:  # the block's error, unwrapped
                self._nursery = nursery
                async with wire.listen(
                    listen_at,
                    self._serve,
                    role="nanny",
                    peer_speaks_first=True,
                    **listen_args(self.security, "nanny"),
                ) as listener:
                    self.address = listener.address
                    await self.plugins.fetch()
                    async with preloads(self.preload_nanny, self):
                        first = trio.Event()
                        failure: list[BaseException] = []
                        nursery.start_soon(self._supervise, first, failure)
                        await first.wait()
                        if failure:
                            raise failure[0]  # from __aenter__
                        self.status = "running"
                        try:
                            yield self
                        finally:
                            self._closing = True
                            self._closing_ev.set()
                            with trio.CancelScope(shield=True):
                                await self._terminate(graceful=True)
                                await self.plugins.teardown_all()
        finally:
            self.environments.close()
            shutil.rmtree(self._scratch, ignore_errors=True)
            os.close(lock_fd)
            self.status = "closed"
            self._closed.set()

    # ----------------------------------------------------------------------------------

    def _listen_address(self) -> str:
        if wire.parse_address(self.scheduler_address)[0] == "inproc":
            return "inproc://nanny-" + str(os.getpid()) + "-" + str(id(self))
        scheme = wire.parse_address(self.scheduler_address)[0]
        return tcp_address(self.host or default_host(self.scheduler_address), self.port, scheme)

    async def _serve(self, stream: wire.Stream) -> None:
        """Answer requests of the scheduler or a client (restart, kill, status)."""
        async for request in stream:
            op = request.get("op") if isinstance(request, dict) else None
            try:
                if op == "restart":
                    address = await self.restart(str(request.get("reason", "restart requested")))
                    reply: dict[str, Any] = {"status": "OK", "worker": address}
                elif op == "kill":
                    await self.kill(str(request.get("reason", "killed on request")))
                    reply = {"status": "OK"}
                elif op in ("plugin_add", "plugin_remove", "plugin_sync"):
                    reply = await self.plugins.handle(request)
                elif op == "status":
                    reply = {
                        "status": "OK",
                        "worker": self.worker_address,
                        "pid": self.pid,
                        "restarts": self.restarts,
                        "environment": self.environments.current,
                    }
                elif op == "env_prepare":
                    await self._prepare_environment(request.get("id"))
                    reply = {"status": "OK"}
                else:
                    reply = {
                        "status": "error",
                        "text": f"unknown op {op!r}; a nanny knows restart, kill, status, "
                        "env_prepare, plugin_add, plugin_remove, plugin_sync",
                    }
            except Exception as exc:
                reply = {"status": "error", "text": f"{type(exc).__name__}: {exc}"}
            await stream.send(reply)

    async def _tell_scheduler(self, worker: str, reason: str) -> None:
        """Tell the scheduler why its worker vanished (it saw only a broken stream).

        Best effort: the scheduler may not know the ``worker_lost_reason`` request.
        """
        with trio.move_on_after(5):
            try:
                stream = await wire.connect(
                    self.scheduler_address,
                    timeout=2,
                    role="nanny",
                    **connect_args(self.security, "nanny"),
                )
                async with stream:
                    await stream.send(
                        {"op": "worker_lost_reason", "worker": worker, "reason": reason}
                    )
                    await stream.receive()
            except (OSError, trio.BrokenResourceError, trio.EndOfChannel) as exc:
                logger.debug("nanny: could not tell the scheduler about %s: %r", worker, exc)

    def _clean_scratch(self) -> None:
        for entry in os.listdir(self._scratch):
            if entry not in (_LOCK_FILE, _TLS_DIR):
                shutil.rmtree(os.path.join(self._scratch, entry), ignore_errors=True)

    def _command(self, ready_fd: int) -> list[str]:
        return [sys.executable, "-m", "trioscheduler", *self._worker_argv(ready_fd)]

    def _worker_argv(self, ready_fd: int) -> list[str]:
        """The ``trioscheduler`` command line of the child (both start methods)."""
        argv = [
            "--log-level", self.log_level,
            "worker", self.scheduler_address, "--no-nanny",
            "--nthreads", str(self.nthreads),
            "--memory-limit", str(self.memory_limit or 0),
            "--ready-fd", str(ready_fd), "--watch-stdin",
        ]  # fmt: skip
        if self.address:
            argv += ["--nanny-address", self.address]
        if self.resources:
            argv += ["--resources", " ".join(f"{k}={v}" for k, v in self.resources.items())]
        if self.name is not None:
            argv += ["--name", self.name]
        if self._scratch:
            argv += ["--local-directory", self._scratch]
        if self.host:
            argv += ["--host", self.host]
        if self.worker_port:
            argv += ["--worker-port", str(self.worker_port)]
        for spec in self.preload:
            argv += ["--preload", spec]
        if self.lifetime is not None:
            argv += ["--lifetime", repr(self.lifetime)]
            argv += ["--lifetime-stagger", repr(self.lifetime_stagger)]
            if self.lifetime_restart:
                argv += ["--lifetime-restart"]
        if self.death_timeout is not None:
            argv += ["--death-timeout", repr(self.death_timeout)]
        if self.record is not None:
            argv += ["--record", os.fspath(self.record)]
        if self.worker_listen_address:
            argv += ["--listen-address", self.worker_listen_address]
        if self.worker_contact_address:
            argv += ["--contact-address", self.worker_contact_address]
        return argv + self._tls_argv

    def fork_unsafe(self) -> str | None:
        """Why the next child must be spawned rather than forked, or None.

        Checked before each start; a fork is also abandoned at the last moment when
        another thread is importing a module (``_fork``).
        """
        if self.start_method == "spawn":
            return "start_method is 'spawn'"
        if not fork_supported():
            return "forking needs Linux with pidfd_open"
        if self.env is not None:
            return "the worker has an environment of its own (env=)"
        if self.start_method == "fork":
            return None
        if self.memory_limit:
            rss = _own_rss()
            if rss > FORK_RSS_FRACTION * self.memory_limit:
                return (
                    f"this process uses {rss / 2**20:.0f} MiB, more than "
                    f"{FORK_RSS_FRACTION:.0%} of the worker's memory limit, which a forked "
                    "child would count as its own"
                )
        return _fork_hostile_library()

    def _environ_base(self) -> dict[str, str]:
        """The environment variables of a worker in a shipped environment (before
        ``LaunchSpec.environ`` removes what would point outside it)."""
        base = dict(os.environ if self.env is None else self.env)
        for name, value in WORKER_ENVIRON.items():
            base.setdefault(name, value)
        return base

    async def _prepare_environment(self, env_id: Any) -> LaunchSpec | None:
        return await self.environments.prepare(
            env_id, cwd=self._scratch, base_env=self._environ_base()
        )

    async def _start_child(self, ready_fd: int) -> trio.Process | _ForkedProcess:
        """Fork or spawn the worker process, which announces itself on ``ready_fd``."""
        choice = await self.environments.scheduler_choice()
        try:
            spec = await self._prepare_environment(choice)
        except Exception as exc:
            raise WorkerStartError(
                f"cannot start the worker in environment {choice}: {exc}"
            ) from exc
        self.environments.started(choice if spec is not None else None)
        if spec is None and self.python is not None:
            try:
                spec = await self.environments.base_spec(
                    cwd=self._scratch, base_env=self._child_env()
                )
            except Exception as exc:
                raise WorkerStartError(
                    f"cannot start the worker with python={self.python}: {exc}"
                ) from exc
        if spec is not None:
            self.started_by = "spawn"
            return await trio.lowlevel.open_process(
                spec.argv(self._worker_argv(ready_fd)),
                pass_fds=(ready_fd,),
                stdin=subprocess.PIPE,
                start_new_session=True,
                env=spec.environ(
                    self._child_env() if spec.env_id == "base" else self._environ_base()
                ),
                cwd=self._scratch,
            )
        why = self.fork_unsafe()
        if why is None:
            try:
                forked = await _fork_worker(
                    self._worker_argv, ready_fd, self._child_env()["PYTHONPATH"]
                )
            except _ForkUnsafe as exc:
                why = str(exc)
            else:
                self.started_by = "fork"
                return forked
        if self.start_method != "spawn":  # said once per start: INFO if fork was asked for
            level = logging.INFO if self.start_method == "fork" else logging.DEBUG
            logger.log(level, "nanny: spawning the worker instead of forking: %s", why)
        self.started_by = "spawn"
        return await trio.lowlevel.open_process(
            self._command(ready_fd),
            pass_fds=(ready_fd,),
            stdin=subprocess.PIPE,
            start_new_session=True,  # a terminal's Ctrl-C goes to us; we stop the child
            env=self._child_env(),
        )

    def _child_env(self) -> dict[str, str]:
        """The environment, plus our ``sys.path`` so that the worker imports what we import.

        As with multiprocessing's spawn: a function from the user's script directory or
        a test module pickles by reference and must load in the worker.
        """
        env = dict(os.environ if self.env is None else self.env)
        prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix}
        extra = [
            os.path.abspath(p or os.getcwd())
            for p in sys.path
            if not any(p.startswith(prefix) for prefix in prefixes if prefix) or not p
        ]
        if env.get("PYTHONPATH"):
            extra.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(extra))
        for name, value in WORKER_ENVIRON.items():
            env.setdefault(name, value)
        return env

    async def _supervise(self, first: trio.Event, failure: list[BaseException]) -> None:
        """Start the worker, wait for it to end, restart it, until the nanny closes."""
        while not self._closing:
            try:
                orderly, reason = await self._run_child(first)
            except WorkerStartError as exc:
                if not first.is_set():
                    failure.append(exc)
                    first.set()
                    return
                logger.error("nanny: could not restart the worker: %s; giving up", exc)
                self.close_reason = str(exc)
                break
            if self._closing:
                break
            if orderly:
                logger.info(
                    "nanny: worker %s closed (%s); the nanny stops too", self.worker_address, reason
                )
                self.close_reason = reason
                break
            self.restarts += 1
            logger.warning(
                "nanny: worker %s (pid %s) %s; restarting it", self.worker_address, self.pid, reason
            )
            if self.worker_address is not None and self._nursery is not None:
                self._nursery.start_soon(self._tell_scheduler, self.worker_address, reason)
            await self._back_off(reason)
        self._closed.set()

    async def _back_off(self, reason: str) -> None:
        """Restarting too often (``RESTART_BURST`` in ``RESTART_WINDOW`` s) waits, longer
        each time (up to ``RESTART_BACKOFF_MAX`` s), and says why: a worker that dies at
        once must not become a restart loop burning a core and flooding the log."""
        now = trio.current_time()
        recent = self._restart_times
        recent.append(now)
        while recent and now - recent[0] > RESTART_WINDOW:
            recent.popleft()
        if len(recent) < RESTART_BURST:
            return
        delay = min(RESTART_BACKOFF_MAX, 0.5 * 2 ** (len(recent) - RESTART_BURST))
        logger.warning(
            "nanny: worker restarted %d times in %.0f s (last: %s); waiting %.1f s before "
            "the next restart",
            len(recent), now - recent[0], reason, delay,
        )  # fmt: skip
        with trio.move_on_after(delay):
            await self._closing_ev.wait()

    async def _run_child(self, first: trio.Event) -> tuple[bool, str]:
        """One child's life: ``(closed_on_purpose, why it ended)``."""
        read_fd, write_fd = os.pipe()
        try:
            proc = await self._start_child(write_fd)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self._process = proc
        self.pid = proc.pid
        self._kill_reason = None
        lines = _Lines(trio.lowlevel.FdStream(read_fd))
        try:
            with trio.move_on_after(self.startup_timeout) as startup:
                line = await lines.next()
            if startup.cancelled_caught or line is None or not line.startswith("address "):
                raise WorkerStartError(
                    f"the worker process (pid {proc.pid}) did not join {self.scheduler_address} "
                    f"within {self.startup_timeout} s"
                    if startup.cancelled_caught
                    else f"the worker process (pid {proc.pid}) exited before joining "
                    f"{self.scheduler_address} (see its log above)"
                )
            self.worker_address = line.split(" ", 1)[1].strip()
            logger.info("nanny: worker %s started (pid %d)", self.worker_address, proc.pid)
            first.set()
            self._started.set()
            closing_line: str | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_memory, proc)

                async def read_rest() -> None:
                    nonlocal closing_line
                    while (text := await lines.next()) is not None:
                        if text.startswith("closing"):
                            closing_line = text[len("closing") :].strip()
                        elif text.startswith("restart"):  # its lifetime ended: start anew
                            self._kill_reason = "reached its lifetime (lifetime_restart)"

                nursery.start_soon(read_rest)
                await proc.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                # Only closing the nanny cancels us: let the worker say goodbye first.
                await self._stop(proc, graceful=True)
                await lines.aclose()
                if proc.stdin is not None:
                    await proc.stdin.aclose()
                self._clean_scratch()  # a killed worker could not remove its spill files
        if closing_line is not None and proc.returncode == 0:
            return True, closing_line or "closed"
        return False, self._kill_reason or _describe_exit(proc.returncode)

    async def _watch_memory(self, proc: trio.Process | _ForkedProcess) -> None:
        if not self.memory_limit or not self.terminate_fraction:
            return
        limit = self.terminate_fraction * self.memory_limit
        try:
            ps = psutil.Process(proc.pid)
            while proc.returncode is None:
                rss = ps.memory_info().rss
                if rss > limit:
                    self._kill_reason = (
                        f"used {rss / 2**20:.0f} MiB, more than {self.terminate_fraction:.0%} of "
                        f"its memory limit of {self.memory_limit / 2**20:.0f} MiB: killed"
                    )
                    logger.warning("nanny: worker %s %s", self.worker_address, self._kill_reason)
                    proc.kill()
                    return
                await trio.sleep(self.monitor_interval)
        except psutil.Error:
            return

    async def _terminate(self, *, graceful: bool) -> None:
        """Stop the current child, if any."""
        self.status = "closing"
        if self._process is not None:
            await self._stop(self._process, graceful=graceful)

    async def _stop(self, proc: trio.Process | _ForkedProcess, *, graceful: bool) -> None:
        """SIGTERM (once per process), SIGKILL after ``close_timeout``; then reap."""
        if proc.returncode is None and graceful:
            if self._sigtermed != proc.pid:
                self._sigtermed = proc.pid
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
            with trio.move_on_after(self.close_timeout):
                await proc.wait()
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class _Lines:
    """Lines of text from a pipe."""

    __slots__ = ("_buffer", "_stream")

    def __init__(self, stream: trio.lowlevel.FdStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> str | None:
        while b"\n" not in self._buffer:
            try:
                chunk = await self._stream.receive_some(4096)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                chunk = b""
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode(errors="replace")

    async def aclose(self) -> None:
        await self._stream.aclose()


# --------------------------------------------------------------------------------------
# Starting a worker by fork
# --------------------------------------------------------------------------------------
#
# This process has other threads (at least the trio loop the nanny runs in), and a fork
# copies only the forking thread. Whatever lock another thread held at that moment stays
# held forever in the child. How each such hazard is met:
#
# * The import machinery: ``os.fork`` takes the global import lock itself, and ``_fork``
#   holds it while it checks that no thread is halfway through importing a module (its
#   ``_ModuleLock`` would never be released in the child); if one is, we spawn.
# * ``sys.stdin/stdout/stderr``: flushed before the fork (nothing written before it is
#   written twice), and replaced in the child by new objects on the same fds (the old
#   ones may hold a lock or bytes another thread wrote since). The old objects are kept
#   alive and never flushed, so their buffers are dropped.
# * ``logging``: its module and handler locks are re-created by logging's own at-fork
#   hook; the child drops the parent's handlers (their files are closed, below) and
#   levels, and ``cli.main`` configures it as for a spawned worker.
# * trio: the run context is thread-local, and the forking thread is a new one outside
#   ``trio.run``, so the child runs its own ``trio.run`` in it; trio clears its thread
#   cache at fork. Signal handlers, the signal mask and the wakeup fd are reset, so the
#   child's trio owns SIGINT/SIGTERM as in a spawned worker.
# * File descriptors: every inherited one but stdio and the ready pipe is pointed at
#   /dev/null (``dup2``), which releases the parent's sockets, pipes and listeners (a
#   scheduler port, another worker's stdin pipe whose EOF must reach that worker) while
#   keeping the numbers taken, so an inherited object that closes "its" fd later cannot
#   close one the child opened. The collector is off from just before the fork until
#   the child's ``gc.freeze()``, so the child never finalizes inherited objects at all.
# * Random state: ``random`` reseeds itself at fork; numpy's global state is reseeded in
#   the child (unless a lost thread holds its lock), or every worker would draw the
#   parent's numbers.
# * Runtimes that do not survive a fork (CUDA, jax, tensorflow, GNU OpenMP): "auto"
#   spawns when one is loaded (``_fork_hostile_library``).
# * The child never returns into the parent's stack: it ends with ``os._exit``.
