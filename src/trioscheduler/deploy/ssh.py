"""``SSHCluster``: a scheduler and workers started over SSH on other machines.

Dask's signature and meaning: the first of ``hosts`` runs the scheduler, each of the
rest runs ``worker_options["n_workers"]`` (default 1) workers of ``worker_class``
(default ``"distributed.Nanny"``, which means our ``Nanny``). ``connect_options`` go to
``asyncssh.connect`` (one dict for all hosts, or a list with one per host);
``remote_python`` is the interpreter on the hosts (default: this one's path).

Each host gets one SSH connection running ``python -m trioscheduler.deploy.spawn``
(see there); the remote process lives exactly as long as its stdin, i.e. the SSH
session, so closing the cluster, or the client process dying (even by SIGKILL: the
kernel closes its sockets, sshd closes the session's pipes), ends everything it started.

The scheduler listens on ``scheduler_options["host"]``, by default the name the client
used to reach its host (the client must reach the scheduler there anyway), on port
``scheduler_options["port"]`` (default 8786, as ``dask scheduler``). Workers listen on
their own host's name likewise.

``security=`` (a ``Security``, or ``True`` for ``Security.temporary()``) makes the
scheduler and workers speak ``tls://`` among themselves and with the client; their
certificates travel inside the SSH connection, never on a command line, and the
client's dask config goes the same way (``remote_setup``), as dask's ``SSHCluster``
forwards it.

asyncssh runs on an asyncio loop in a thread of its own (``AsyncioThread``); the cluster
itself is a trio object like ``LocalCluster``: sync through the background trio loop, or
``async with SSHCluster(..., asynchronous=True)`` inside a trio program. Needs the
``trioscheduler[ssh]`` extra.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import shlex
import sys
import warnings
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import trio

from trioscheduler import wire
from trioscheduler.deploy import remote_setup
from trioscheduler.deploy.asyncio_thread import AsyncioThread
from trioscheduler.deploy.facade import SyncAsyncFacade
from trioscheduler.deploy.spawn import ERROR_MARK, MARK
from trioscheduler.errors import TrioSchedulerError
from trioscheduler.wire.security import Security
from trioscheduler.wire.security import resolve as resolve_security

logger = logging.getLogger("trioscheduler.ssh")

_ids = itertools.count(1)
_IGNORED = ("loop",)  # dask's deprecated loop=: accepted, meaningless here
STOP_TIMEOUT = 30.0
"""Seconds a remote process gets to shut down after its stdin closed, before the SSH
connection is closed under it (which ends it too)."""


class SSHClusterError(TrioSchedulerError, RuntimeError):
    """A remote scheduler or worker could not be started (the remote error is in it)."""


def _asyncssh() -> Any:
    try:
        with warnings.catch_warnings():  # asyncssh imports cryptography's deprecated DSA
            warnings.filterwarnings("ignore", message="DSA is deprecated")
            import asyncssh
    except ImportError:
        raise ImportError("SSHCluster needs asyncssh: pip install 'trioscheduler[ssh]'") from None
    return asyncssh


class _Remote:
    """One SSH connection running one spawn process. Its methods run on the asyncio loop."""

    def __init__(
        self, host: str, connect_options: dict[str, Any], command: str, label: str, setup: str
    ) -> None:
        self.host = host
        self.connect_options = connect_options
        self.command = command
        self.label = label
        self.setup = setup  # remote_setup's line: certificates and config, on stdin
        self.conn: Any = None
        self.proc: Any = None
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self._drains: list[asyncio.Task[None]] = []

    async def start(self, expect: int) -> list[str]:
        """Connect, run the command, return the ``expect`` addresses it announces."""
        asyncssh = _asyncssh()
        try:
            try:
                self.conn = await asyncssh.connect(self.host, **self.connect_options)
            except (OSError, asyncssh.Error) as exc:
                raise SSHClusterError(
                    f"SSHCluster: cannot connect to {self.host!r} for the {self.label}: {exc}"
                ) from exc
            self.proc = await self.conn.create_process(self.command)
            self.proc.stdin.write(self.setup + "\n")
            self._drains.append(asyncio.ensure_future(self._drain(self.proc.stderr)))
            addresses: list[str] = []
            error = ""
            while len(addresses) < expect:
                line = await self.proc.stdout.readline()
                if not line:  # the process ended before it was ready
                    await self.proc.wait_closed()
                    await asyncio.gather(*self._drains, return_exceptions=True)
                    tail = "\n".join(self.tail)
                    raise SSHClusterError(
                        f"SSHCluster: the {self.label} on {self.host!r} failed to start"
                        f"{': ' + error if error else ''} (exit status "
                        f"{self.proc.exit_status}; command {self.command!r})\n{tail}"
                    )
                if line.startswith(MARK):
                    addresses.append(json.loads(line[len(MARK) :])["address"])
                elif line.startswith(ERROR_MARK):
                    error = json.loads(line[len(ERROR_MARK) :])
                else:
                    logger.info("[%s %s] %s", self.label, self.host, line.rstrip())
            self._drains.append(asyncio.ensure_future(self._drain(self.proc.stdout)))
            return addresses
        except BaseException:
            await self.stop(0)
            raise

    async def _drain(self, reader: Any) -> None:
        """Read (and log) the remote output, so it never stalls on a full SSH window."""
        async for line in reader:
            text = line.rstrip()
            self.tail.append(text)
            logger.debug("[%s %s] %s", self.label, self.host, text)

    async def stop(self, grace: float = STOP_TIMEOUT) -> None:
        """Close the remote stdin (the process shuts down), wait for it, disconnect."""
        try:
            if self.proc is not None and grace > 0:
                try:
                    self.proc.stdin.write_eof()
                    await asyncio.wait_for(self.proc.wait_closed(), grace)
                except (TimeoutError, OSError, _asyncssh().Error) as exc:
                    logger.warning("%s on %s did not stop in time: %r", self.label, self.host, exc)
        finally:
            for task in self._drains:
                task.cancel()
            if self.conn is not None:
                self.conn.close()
                await self.conn.wait_closed()


class SSHCluster(SyncAsyncFacade):
    """``with SSHCluster(["sched-host", "worker-1", "worker-2"]) as cluster: Client(cluster)``."""

    def __init__(
        self,
        hosts: list[str] | None = None,
        connect_options: dict[str, Any] | list[dict[str, Any]] | None = None,
        worker_options: dict[str, Any] | None = None,
        scheduler_options: dict[str, Any] | None = None,
        worker_class: str = "distributed.Nanny",
        remote_python: str | list[str] | None = None,
        *,
        asynchronous: bool = False,
        name: str | None = None,
        security: Security | bool | None = None,
        **kwargs: Any,
    ) -> None:
        for key in _IGNORED:
            kwargs.pop(key, None)
        if kwargs:
            raise TypeError(f"SSHCluster() got unexpected keyword arguments: {sorted(kwargs)}")
        if not hosts or isinstance(hosts, str):
            raise ValueError(f"SSHCluster: hosts must be a non-empty list, not {hosts!r}")
        if isinstance(connect_options, list) and len(connect_options) != len(hosts):
            raise ValueError(
                "SSHCluster: connect_options as a list needs one dict per host "
                f"({len(hosts)}), got {len(connect_options)}"
            )
        if isinstance(remote_python, list) and len(remote_python) != len(hosts):
            raise ValueError(
                "SSHCluster: remote_python as a list needs one path per host "
                f"({len(hosts)}), got {len(remote_python)}"
            )
        for options, label in ((scheduler_options, "scheduler"), (worker_options, "worker")):
            if options and "security" in options:
                raise TypeError(
                    f"SSHCluster: give security= to SSHCluster itself, not in {label}_options "
                    "(it is shipped over SSH, never on a command line)"
                )
        _asyncssh()  # the missing extra is reported here, not on the loop thread
        self.security = resolve_security(security)
        self.hosts = list(hosts)
        self.connect_options = connect_options or {}
        self.worker_options = dict(worker_options or {})
        self.scheduler_options = dict(scheduler_options or {})
        self.worker_class = worker_class
        self.remote_python = remote_python
        self.asynchronous = asynchronous
        self._id = next(_ids)
        self.name = name or f"SSHCluster-{self._id}"
        self.scheduler_address = ""
        self.workers: dict[str, list[str]] = {}  # "host-i" -> addresses of its workers
        self.status = "created"
        self._life: AbstractAsyncContextManager[Any] | None = None
        self._bridge: AsyncioThread | None = None
        self._scheduler: _Remote | None = None
        self._handle: Any = None
        self._setup = ""  # remote_setup's line, made when the cluster starts
        if not asynchronous:
            from trioscheduler.deploy.loop import loop_runner

            self._handle = loop_runner().enter(self._open(), name=self.name)

    def __repr__(self) -> str:
        n = sum(len(a) for a in self.workers.values())
        return f"SSHCluster({self.scheduler_address!r}, workers={n}, {self.status})"

    @property
    def worker_addresses(self) -> list[str]:
        return [a for addresses in self.workers.values() for a in addresses]

    def _host_options(self, i: int) -> tuple[dict[str, Any], str]:
        opts = self.connect_options
        connect = dict(opts[i] if isinstance(opts, list) else opts)
        py = self.remote_python
        python = (py[i] if isinstance(py, list) else py) or sys.executable
        return connect, python

    def _command(self, python: str, *args: str, options: dict[str, Any]) -> str:
        return shlex.join(
            [python, "-m", "trioscheduler.deploy.spawn", *args, "--options", json.dumps(options)]
        )

    # -- the cluster's life ----------------------------------------------------------

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[SSHCluster]:
        import dask.config

        self.status = "starting"
        remotes: list[_Remote] = []
        self._setup = remote_setup.pack(self.security, dask.config.config)
        try:
            async with AsyncioThread(f"{self.name}-asyncssh") as bridge:
                try:
                    connect, python = self._host_options(0)
                    sched_opts = {"host": self.hosts[0], **self.scheduler_options}
                    scheduler = _Remote(
                        self.hosts[0], connect,
                        self._command(python, "scheduler", options=sched_opts), "scheduler",
                        self._setup,
                    )  # fmt: skip
                    remotes.append(scheduler)
                    self._bridge, self._scheduler = bridge, scheduler
                    (self.scheduler_address,) = await bridge.call(scheduler.start, 1)
                    logger.info("scheduler at %s on %s", self.scheduler_address, self.hosts[0])
                    n = int(self.worker_options.get("n_workers", 1))
                    try:
                        await self._start_all_workers(bridge, remotes, n)
                    except BaseExceptionGroup as group:  # one host failed: say which way
                        raise wire.sole_error(group) from None
                    self.status = "running"
                    yield self
                finally:
                    self.status = "closing"
                    with trio.CancelScope(shield=True):
                        await self._stop(bridge, remotes)
        finally:
            self.workers.clear()
            self._bridge = self._scheduler = None
            self.status = "closed"

    async def _start_all_workers(
        self, bridge: AsyncioThread, remotes: list[_Remote], n: int
    ) -> None:
        async with trio.open_nursery() as nursery:  # every host at once
            for i, host in enumerate(self.hosts[1:], start=1):
                connect, python = self._host_options(i)
                opts = {"host": host, **self.worker_options}
                cmd = self._command(
                    python, "worker", self.scheduler_address,
                    "--worker-class", self.worker_class, options=opts,
                )  # fmt: skip
                remote = _Remote(host, connect, cmd, "workers", self._setup)
                remotes.append(remote)
                nursery.start_soon(self._start_workers, bridge, remote, i, n)

    async def finished(self) -> None:
        """Until the scheduler's remote process has ended (e.g. its ``idle_timeout``)."""
        bridge, scheduler = self._bridge, self._scheduler
        if bridge is None or scheduler is None or scheduler.proc is None:
            raise RuntimeError("the cluster is not running")
        await bridge.call(scheduler.proc.wait_closed)

    async def _start_workers(self, bridge: AsyncioThread, remote: _Remote, i: int, n: int) -> None:
        self.workers[f"{remote.host}-{i}"] = await bridge.call(remote.start, n)

    async def _stop(self, bridge: AsyncioThread, remotes: list[_Remote]) -> None:
        """Workers first (they say goodbye to the scheduler), then the scheduler."""
        workers, scheduler = remotes[1:], remotes[:1]
        for group in (workers, scheduler):

            async def stop_all(group: list[_Remote] = group) -> None:
                await asyncio.gather(*(r.stop() for r in group), return_exceptions=True)

            if group:
                await bridge.call(stop_all)
