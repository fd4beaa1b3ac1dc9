"""The ``trioscheduler`` command: ``scheduler``, ``worker`` and ``demo``.

Each command is one ``trio.run`` whose main task holds the components in ``async with``
blocks; SIGINT and SIGTERM cancel that task, so shutdown is the ordinary exit path of
those blocks (workers say goodbye to the scheduler, nannies reap their children) and
prints one log line instead of a traceback.

A ``worker`` under a nanny starts its process with ``--start-method`` (default
``spawn``: a long-lived command gains little from forking, and a fresh interpreter
shares nothing with the nanny).

``worker`` has two hidden options used by ``Nanny``: ``--ready-fd`` (a pipe on which the
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
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

logger = logging.getLogger("trioscheduler.cli")

START_METHOD_ENV = "TRIOSCHEDULER_WORKER_START_METHOD"  # as trioscheduler.nanny's


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


# --------------------------------------------------------------------------------------
# scheduler
# --------------------------------------------------------------------------------------


async def _scheduler_main(args: argparse.Namespace) -> None:
    from trioscheduler.scheduler import Scheduler

    address = args.address or f"tcp://{args.host}:{args.port}"
    async with Scheduler(address, worker_timeout=args.worker_timeout, record=args.record) as s:
        contact = contact_address(s.address)
        logger.info("scheduler at %s", contact)
        print(f"trioscheduler scheduler at {contact}", flush=True)
        if args.scheduler_file:
            _write_json(args.scheduler_file, {"type": "Scheduler", "address": contact})
        try:
            await trio.sleep_forever()
        finally:
            if args.scheduler_file:
                try:
                    os.remove(args.scheduler_file)
                except OSError:
                    pass


def contact_address(address: str) -> str:
    """The address others should use: a wildcard bind (0.0.0.0) becomes this host's IP."""
    from trioscheduler.wire import parse_address
    from trioscheduler.wire.address import tcp_address

    scheme, host, port = parse_address(address)
    if scheme != "tcp" or host not in ("0.0.0.0", "::") or port is None:
        return address
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("8.8.8.8", 80))  # UDP: picks the outward interface, sends nothing
            return tcp_address(str(probe.getsockname()[0]), port)
    except OSError:
        return tcp_address(socket.gethostname(), port)


def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# worker
# --------------------------------------------------------------------------------------


def _scheduler_address(args: argparse.Namespace) -> str:
    if args.address:
        return str(args.address)
    if args.scheduler_file:
        with open(args.scheduler_file) as f:
            return str(json.load(f)["address"])
    raise SystemExit("trioscheduler worker: give the scheduler ADDRESS or --scheduler-file")


async def _worker_main(args: argparse.Namespace) -> None:
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
        from trioscheduler.nanny import Nanny

        method = args.start_method or os.environ.get(START_METHOD_ENV) or "spawn"

        def make(name: str | None) -> Any:
            return Nanny(address, name=name, host=args.host, start_method=method, **common)
    else:
        from trioscheduler.worker import Worker, default_host

        listen = None if args.host is None else f"tcp://{args.host}:0"
        if listen is None and not address.startswith("inproc://"):
            listen = f"tcp://{default_host(address)}:0"

        def make(name: str | None) -> Any:
            return Worker(address, address=listen, name=name, nanny=args.nanny_address, **common)

    components: list[Any] = [None] * nworkers
    ready = _ReadyPipe(args.ready_fd)
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


class _ReadyPipe:
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


# --------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------


def _pi_chunk(seed: int, samples: int) -> int:
    """Monte Carlo: how many of ``samples`` random points fall inside the unit circle."""
    import random

    rng = random.Random(seed)
    rand = rng.random
    return sum(1 for _ in range(samples) if rand() ** 2 + rand() ** 2 <= 1.0)


def _collatz_longest(lo: int, hi: int) -> tuple[int, int]:
    """``(steps, n)`` of the longest Collatz chain starting in ``[lo, hi)``."""
    best = (0, lo)
    for start in range(lo, hi):
        n, steps = start, 0
        while n != 1:
            n = n // 2 if n % 2 == 0 else 3 * n + 1
            steps += 1
        best = max(best, (steps, start))
    return best


def _longest(*chains: tuple[int, int]) -> tuple[int, int]:
    return max(chains)


def run_demo(
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    processes: bool = True,
    ntasks: int = 2000,
    samples: int = 4000,
) -> int:
    """Start a local cluster, run a futures workload and a dask graph, print timings."""
    from dask.base import compute
    from dask.delayed import delayed
    from tqdm import tqdm

    from trioscheduler import as_completed
    from trioscheduler.client import Client
    from trioscheduler.cluster import LocalCluster

    def sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, sigterm)  # SIGTERM: the same clean exit as Ctrl-C
    except ValueError:  # not the main thread: leave signals alone
        pass
    out = sys.stdout
    t0 = time.perf_counter()
    print("trioscheduler demo: starting a local cluster ...", file=out, flush=True)
    with LocalCluster(n_workers, threads_per_worker, processes=processes) as cluster:
        with Client(cluster) as client:
            t_up = time.perf_counter() - t0
            kind = "processes" if processes else "threads in this process"
            print(
                f"  {cluster.n_workers} workers x {cluster.threads_per_worker} thread(s) "
                f"({kind}) at {cluster.scheduler_address}, up in {t_up:.2f} s",
                file=out,
                flush=True,
            )

            print(
                f"[1/2] futures: estimate pi with {ntasks} Monte Carlo tasks", file=out, flush=True
            )
            t1 = time.perf_counter()
            futures = client.map(_pi_chunk, range(ntasks), samples=samples)
            with tqdm(total=ntasks, unit="task", file=sys.stderr, mininterval=0.2) as bar:
                for _ in as_completed(futures):
                    bar.update(1)
            inside = client.submit(sum, futures).result()
            dt1 = time.perf_counter() - t1
            pi = 4 * inside / (ntasks * samples)
            print(
                f"  pi ~ {pi:.5f} from {ntasks * samples:,} samples: {dt1:.2f} s, "
                f"{ntasks / dt1:,.0f} tasks/s",
                file=out,
                flush=True,
            )
            del futures

            limit, chunk = 60_000, 1_000
            print(
                f"[2/2] dask.delayed: longest Collatz chain below {limit:,} "
                f"({limit // chunk} tasks and a tree reduction)",
                file=out,
                flush=True,
            )
            t2 = time.perf_counter()
            parts = [delayed(_collatz_longest)(lo, lo + chunk) for lo in range(1, limit, chunk)]
            while len(parts) > 1:
                parts = [delayed(_longest)(*parts[i : i + 4]) for i in range(0, len(parts), 4)]
            steps, start = compute(parts[0], scheduler=client.get)[0]  # type: ignore[no-untyped-call]
            dt2 = time.perf_counter() - t2
            print(f"  {start:,} takes {steps} steps to reach 1: {dt2:.2f} s", file=out, flush=True)
        t3 = time.perf_counter()
    print(
        f"cluster closed in {time.perf_counter() - t3:.2f} s; total {time.perf_counter() - t0:.2f} s",
        file=out,
        flush=True,
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    return run_demo(
        n_workers=args.workers,
        threads_per_worker=args.threads,
        processes=not args.no_processes,
        ntasks=args.tasks,
    )


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    """An error for one log line: the leaves of an exception group, joined."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trioscheduler",
        description="A distributed task scheduler with the API of dask.distributed, on trio.",
    )
    parser.add_argument(
        "--log-level", default=None, help="logging level (default: info; demo: warning)"
    )
    from trioscheduler import __version__

    parser.add_argument("--version", action="version", version=f"trioscheduler {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("scheduler", help="run a scheduler")
    p.add_argument("address", nargs="?", help="full address to listen on (overrides --host/--port)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to listen on (default: this machine only; 0.0.0.0 accepts workers "
        "and clients from other machines)",
    )
    p.add_argument("--port", type=int, default=8786, help="port to listen on (0: any free port)")
    p.add_argument("--scheduler-file", help="write the scheduler's address to this JSON file")
    p.add_argument("--worker-timeout", type=float, default=30.0, help="seconds without heartbeat")
    p.add_argument("--record", help="log every event of the scheduler core to this file")

    p = sub.add_parser("worker", help="run a worker (under a nanny by default)")
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

    p = sub.add_parser("demo", help="start a local cluster and run a demo workload on it")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: by cores)")
    p.add_argument("--threads", type=int, default=None, help="threads per worker")
    p.add_argument("--tasks", type=int, default=2000, help="tasks in the futures workload")
    p.add_argument(
        "--no-processes", action="store_true", help="everything in this process (inproc://)"
    )
    return parser


_parser: argparse.ArgumentParser | None = None


def parser() -> argparse.ArgumentParser:
    """``build_parser()``, built once per process. A nanny builds it before it forks, so
    a forked worker only parses (building one in a fresh process costs 2-6 ms)."""
    global _parser
    if _parser is None:
        _parser = build_parser()
    return _parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    level = args.log_level or ("warning" if args.command == "demo" else "info")
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if args.command == "demo":
        try:
            return _demo(args)
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130
    command = _scheduler_main if args.command == "scheduler" else _worker_main
    try:
        trio.run(run_until_signal, lambda: command(args))
    except KeyboardInterrupt:  # a signal that arrived before the handler was installed
        return 130
    except Exception as exc:
        logger.error("%s failed: %s", args.command, _describe(exc))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
