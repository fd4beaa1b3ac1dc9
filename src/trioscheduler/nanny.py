"""The nanny: keeps one worker alive in a child process.

The child is ``python -m trioscheduler worker ADDRESS --no-nanny`` (a plain subprocess:
nothing of this process is inherited, so a task that corrupts its interpreter harms only
its worker). The nanny restarts the child when it dies, or kills and restarts it when
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
"restarts"}``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import psutil
import trio

from trioscheduler import memory, wire
from trioscheduler.errors import TrioSchedulerError
from trioscheduler.wire.address import tcp_address

logger = logging.getLogger("trioscheduler.nanny")


class WorkerStartError(TrioSchedulerError):
    """The worker process exited or stayed silent before it joined the scheduler."""


class Nanny:
    """``async with Nanny(scheduler_address, nthreads=2) as n: ...``; ``n.worker_address``.

    ``memory_limit`` is resolved here (``"auto"`` shares system memory among ``nworkers``)
    and passed to the child in bytes, so both judge memory against the same number.
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
    ) -> None:
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

        self.worker_address: str | None = None
        self.address: str | None = None  # where the nanny takes requests
        self.pid: int | None = None
        self.restarts = 0
        self.status = "created"  # created -> running -> closing -> closed
        self.close_reason = ""
        self._process: trio.Process | None = None
        self._kill_reason: str | None = None
        self._sigtermed: int | None = None  # the pid we sent SIGTERM to
        self._closing = False
        self._closed = trio.Event()
        self._started = trio.Event()  # a (re)started child announced its address
        self._life: AbstractAsyncContextManager[Any] | None = None  # _run(), while open
        self._nursery: trio.Nursery | None = None
        self._scratch = ""  # our directory for the children's spill files

    def __repr__(self) -> str:
        return f"<Nanny {self.worker_address or '(no worker)'} pid={self.pid} {self.status}>"

    # ----------------------------------------------------------------------------------

    async def __aenter__(self) -> Nanny:
        # A start-up failure inside _run() has already unwound what it opened.
        life = self._run()
        await life.__aenter__()
        self._life = life
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        assert self._life is not None
        return await self._life.__aexit__(*exc_info)

    async def finished(self) -> None:
        """Wait until the nanny stopped (closed, or its worker closed on purpose)."""
        await self._closed.wait()

    async def close(self) -> None:
        """Terminate the worker and stop looking after it."""
        self._closing = True
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
        error: BaseException | None = None  # the block's own error, raised unwrapped
        listen_at = self._listen_address()
        base = self.local_directory or tempfile.gettempdir()
        os.makedirs(base, exist_ok=True)
        self._scratch = tempfile.mkdtemp(prefix="trioscheduler-nanny-", dir=base)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    async with wire.listen(listen_at, self._serve, role="nanny") as listener:
                        self.address = listener.address
                        first = trio.Event()
                        failure: list[BaseException] = []
                        nursery.start_soon(self._supervise, first, failure)
                        await first.wait()
                        if failure:
                            error = failure[0]  # raised from __aenter__, below
                        else:
                            self.status = "running"
                            try:
                                yield self
                            except BaseException as exc:
                                error = exc
                            finally:
                                self._closing = True
                                with trio.CancelScope(shield=True):
                                    await self._terminate(graceful=True)
                except BaseException as exc:  # start-up failed: raised unwrapped, below
                    error = exc
                nursery.cancel_scope.cancel()
        finally:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self.status = "closed"
            self._closed.set()
        if error is not None:
            raise error

    # ----------------------------------------------------------------------------------

    def _listen_address(self) -> str:
        from trioscheduler.worker import default_host

        if wire.parse_address(self.scheduler_address)[0] == "inproc":
            return "inproc://nanny-" + str(os.getpid()) + "-" + str(id(self))
        return tcp_address(self.host or default_host(self.scheduler_address), 0)

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
                elif op == "status":
                    reply = {
                        "status": "OK",
                        "worker": self.worker_address,
                        "pid": self.pid,
                        "restarts": self.restarts,
                    }
                else:
                    reply = {
                        "status": "error",
                        "text": f"unknown op {op!r}; a nanny knows restart, kill, status",
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
                stream = await wire.connect(self.scheduler_address, timeout=2, role="nanny")
                async with stream:
                    await stream.send(
                        {"op": "worker_lost_reason", "worker": worker, "reason": reason}
                    )
                    await stream.receive()
            except (OSError, trio.BrokenResourceError, trio.EndOfChannel) as exc:
                logger.debug("nanny: could not tell the scheduler about %s: %r", worker, exc)

    def _clean_scratch(self) -> None:
        for entry in os.listdir(self._scratch):
            shutil.rmtree(os.path.join(self._scratch, entry), ignore_errors=True)

    def _command(self, ready_fd: int) -> list[str]:
        cmd = [
            sys.executable, "-m", "trioscheduler", "--log-level", self.log_level,
            "worker", self.scheduler_address, "--no-nanny",
            "--nthreads", str(self.nthreads),
            "--memory-limit", str(self.memory_limit or 0),
            "--ready-fd", str(ready_fd), "--watch-stdin",
        ]  # fmt: skip
        if self.address:
            cmd += ["--nanny-address", self.address]
        if self.resources:
            cmd += ["--resources", " ".join(f"{k}={v}" for k, v in self.resources.items())]
        if self.name is not None:
            cmd += ["--name", self.name]
        if self._scratch:
            cmd += ["--local-directory", self._scratch]
        if self.host:
            cmd += ["--host", self.host]
        return cmd

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
        self._closed.set()

    async def _run_child(self, first: trio.Event) -> tuple[bool, str]:
        """One child's life: ``(closed_on_purpose, why it ended)``."""
        read_fd, write_fd = os.pipe()
        try:
            proc = await trio.lowlevel.open_process(
                self._command(write_fd),
                pass_fds=(write_fd,),
                stdin=subprocess.PIPE,
                start_new_session=True,  # a terminal's Ctrl-C goes to us; we stop the child
                env=self._child_env(),
            )
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

    async def _watch_memory(self, proc: trio.Process) -> None:
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

    async def _stop(self, proc: trio.Process, *, graceful: bool) -> None:
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
