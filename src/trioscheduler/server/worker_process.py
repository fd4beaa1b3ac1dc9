"""A process that runs workers: what ``trioscheduler worker`` and a nanny's child run.

The CLI (``trioscheduler.cli``) adds these options to its ``worker`` command and calls
``run``; a ``Nanny`` starts its worker process with the same command line (spawned as
``python -m trioscheduler worker ...``, or forked and calling ``main`` here), so the
nanny never needs the CLI above it.

The process is one ``trio.run`` whose main task holds the components in ``async with``
blocks; SIGINT and SIGTERM cancel that task (``run_until_signal``), so shutdown is the
ordinary exit path of those blocks (workers say goodbye to the scheduler, nannies reap
their children) and prints one log line instead of a traceback.

A worker under a nanny starts its process with ``--start-method`` (default ``spawn``: a
long-lived command gains little from forking, and a fresh interpreter shares nothing with
the nanny). Two hidden options serve the nanny: ``--ready-fd`` (a pipe on which the
process announces its address, and later that it closes on purpose) and
``--watch-stdin`` (exit when stdin reaches EOF, i.e. when the nanny is gone, even if it
was killed with SIGKILL and could not clean up).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

__all__ = [
    "START_METHOD_ENV",
    "add_arguments",
    "configure_logging",
    "describe",
    "main",
    "parse_resources",
    "run",
    "run_until_signal",
]

logger = logging.getLogger("trioscheduler.worker_process")

START_METHOD_ENV = "TRIOSCHEDULER_WORKER_START_METHOD"  # as trioscheduler.server.nanny's


def parse_resources(text: str | None) -> dict[str, float]:
    """``"GPU=2 MEMORY=10e9"`` (spaces or commas between pairs) as a dict."""
    resources: dict[str, float] = {}
    if not text:
        return resources
    for item in text.replace(",", " ").split():
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"resource {item!r} is not NAME=AMOUNT (e.g. GPU=2)")
        try:
            resources[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"resource {name!r} has amount {value!r}, which is not a number"
            ) from None
    return resources


async def run_until_signal(main: Callable[[], Awaitable[Any]]) -> bool:
    """Run ``main`` until it returns or SIGINT/SIGTERM arrives; True if a signal stopped it."""
    stopped_by_signal = False
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal stopped_by_signal
                async for signum in signals:
                    logger.info("%s received: shutting down", signal.Signals(signum).name)
                    stopped_by_signal = True
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(watch)
            await main()
            nursery.cancel_scope.cancel()
    return stopped_by_signal


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def describe(exc: BaseException) -> str:
    """An error for one log line: the leaves of an exception group, joined."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``trioscheduler worker``."""
    p.add_argument("address", nargs="?", help="the scheduler's address, e.g. tcp://10.0.0.5:8786")
    p.add_argument("--scheduler-file", help="read the scheduler's address from this JSON file")
    p.add_argument(
        "--nthreads", type=int, default=0, help="threads per worker (default: cores / nworkers)"
    )
    p.add_argument("--nworkers", type=int, default=1, help="worker processes to start")
    p.add_argument(
        "--memory-limit", default="auto", help="bytes per worker: auto, 4GiB, 0.5, 0 for none"
    )
    p.add_argument("--resources", type=parse_resources, default={}, help='e.g. "GPU=2 FPGA=1"')
    p.add_argument("--name", help="name of the worker (with --nworkers: a prefix)")
    p.add_argument(
        "--nanny",
        dest="nanny",
        action="store_true",
        default=True,
        help="restart the worker when it dies (default)",
    )
    p.add_argument(
        "--no-nanny", dest="nanny", action="store_false", help="run the worker in this process"
    )
    p.add_argument("--local-directory", help="where spill files go (default: the temp directory)")
    p.add_argument(
        "--start-method",
        choices=("spawn", "fork", "auto"),
        help="how the nanny starts worker processes: spawn, a fresh interpreter (default; "
        f"or ${START_METHOD_ENV}), fork of the nanny, or auto (fork where safe)",
    )
    p.add_argument(
        "--host", help="interface to serve data on (default: the one that reaches the scheduler)"
    )
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--watch-stdin", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--nanny-address", help=argparse.SUPPRESS)


_parser: argparse.ArgumentParser | None = None


def parser() -> argparse.ArgumentParser:
    """The parser of a nanny child's command line (``--log-level L worker ...``), built
    once per process. A nanny builds it before it forks, so a forked worker only parses
    (building one in a fresh process costs a few ms)."""
    global _parser
    if _parser is None:
        _parser = argparse.ArgumentParser(prog="trioscheduler")
        _parser.add_argument("--log-level", default="info")
        sub = _parser.add_subparsers(dest="command", required=True)
        add_arguments(sub.add_parser("worker"))
    return _parser


def main(argv: Sequence[str]) -> int:
    """A nanny's forked child: run the worker its command line describes; the exit code."""
    args = parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        trio.run(run_until_signal, lambda: run(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        logger.error("worker failed: %s", describe(exc))
        return 1
    return 0


def _scheduler_address(args: argparse.Namespace) -> str:
    if args.address:
        return str(args.address)
    if args.scheduler_file:
        with open(args.scheduler_file) as f:
            return str(json.load(f)["address"])
    raise SystemExit("trioscheduler worker: give the scheduler ADDRESS or --scheduler-file")


async def run(args: argparse.Namespace) -> None:
    address = _scheduler_address(args)
    nworkers = max(1, args.nworkers)
    nthreads = args.nthreads or max(1, (os.cpu_count() or 1) // nworkers)
    common: dict[str, Any] = dict(
        nthreads=nthreads,
        memory_limit=args.memory_limit,
        resources=args.resources,
        local_directory=args.local_directory,
        nworkers=nworkers,
    )
    names = [
        None if args.name is None else (args.name if nworkers == 1 else f"{args.name}-{i}")
        for i in range(nworkers)
    ]
    if args.nanny:
        from trioscheduler.server.nanny import Nanny

        method = args.start_method or os.environ.get(START_METHOD_ENV) or "spawn"

        def make(name: str | None) -> Any:
            return Nanny(address, name=name, host=args.host, start_method=method, **common)
    else:
        from trioscheduler.server.worker import Worker, default_host

        listen = None if args.host is None else f"tcp://{args.host}:0"
        if listen is None and not address.startswith("inproc://"):
            listen = f"tcp://{default_host(address)}:0"

        def make(name: str | None) -> Any:
            return Worker(address, address=listen, name=name, nanny=args.nanny_address, **common)

    components: list[Any] = [None] * nworkers
    ready = ReadyPipe(args.ready_fd)
    async with trio.open_nursery() as nursery:
        if args.watch_stdin:
            nursery.start_soon(_exit_on_stdin_eof, nursery.cancel_scope)
        async with trio.open_nursery() as starters:  # all start (and later stop) at once
            for i, name in enumerate(names):
                starters.start_soon(_start_into, nursery, make(name), components, i)
        addresses = [getattr(c, "worker_address", c.address) for c in components]
        if args.ready_fd is None:
            pid = f" (nanny pid {os.getpid()})" if args.nanny else ""
            for a in addresses:
                print(f"trioscheduler worker at {a}{pid}", flush=True)
        ready.write("".join(f"address {a}\n" for a in addresses))
        try:
            async with trio.open_nursery() as waiters:
                for c in components:
                    waiters.start_soon(c.finished)
            # Every worker closed on its own (scheduler asked or vanished): an orderly end.
            reasons = "; ".join(str(getattr(c, "close_reason", "")) for c in components)
            ready.write(f"closing {reasons}\n")
        finally:
            ready.close()
        nursery.cancel_scope.cancel()


async def _start_into(nursery: trio.Nursery, cm: Any, out: list[Any], i: int) -> None:
    out[i] = await nursery.start(_hold, cm)


async def _hold(cm: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Keep one worker or nanny open in a task of its own, until it finishes."""
    async with cm as component:
        task_status.started(component)
        await component.finished()


class ReadyPipe:
    """The write end of the nanny's pipe (or nothing, outside a nanny)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def write(self, text: str) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, text.encode())
        except OSError:
            pass

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None


async def _exit_on_stdin_eof(scope: trio.CancelScope) -> None:
    """The nanny holds our stdin open; EOF means it is gone, so we go too."""
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stream:
        while await stream.receive_some(4096):
            pass
    logger.warning("the nanny is gone (stdin closed): shutting down")
    scope.cancel()
