"""The ``trioscheduler`` command: ``scheduler``, ``worker``, ``ssh`` and ``demo``.

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
from collections.abc import Sequence
from typing import Any

import trio

from trioscheduler.server.collector import tune_collector
from trioscheduler.server.worker_process import add_arguments as add_worker_arguments
from trioscheduler.server.worker_process import (
    configure_logging,
    describe,
    interface_host,
    parse_seconds,
    pid_file,
    run_until_signal,
    security_from_args,
    tls_arguments,
)
from trioscheduler.server.worker_process import run as run_worker
from trioscheduler.wire import busy_poll

logger = logging.getLogger("trioscheduler.cli")

# --------------------------------------------------------------------------------------
# scheduler
# --------------------------------------------------------------------------------------


async def _scheduler_main(args: argparse.Namespace) -> None:
    from trioscheduler.server.scheduler import Scheduler

    security = security_from_args(args, "scheduler")
    protocol = "tls" if security is not None else args.protocol
    host = interface_host(args.interface) if args.interface else args.host
    address = args.address or f"{protocol}://{host}:{args.port}"
    with pid_file(args.pid_file):
        await _serve_scheduler(
            Scheduler(
                address,
                worker_timeout=args.worker_timeout,
                record=args.record,
                recover_from=args.recover_from,
                log_fsync_interval=args.log_fsync_interval,
                recovery_grace=args.recovery_grace,
                idle_timeout=args.idle_timeout,
                preload=args.preload,
                security=security,
                dashboard_address=args.dashboard_address if args.dashboard else None,
                close_workers=args.close_workers,
            ),
            args,
        )


def _fsync_interval(text: str) -> float | None:
    if text.strip().lower() in ("never", "none"):
        return None
    return parse_seconds(text)


async def _serve_scheduler(scheduler: Any, args: argparse.Namespace) -> None:
    from trioscheduler.http import format_dashboard_link
    from trioscheduler.wire import parse_address

    async with scheduler as s:
        contact = contact_address(s.address)
        logger.info("scheduler at %s", contact)
        print(f"trioscheduler scheduler at {contact}", flush=True)
        if s.dashboard is not None:
            link = format_dashboard_link(s.dashboard.host, s.dashboard.port, parse_address(contact)[1])
            print(f"dashboard at {link}", flush=True)
        if args.scheduler_file:
            _write_json(args.scheduler_file, {"type": "Scheduler", "address": contact})
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_close_on_signal, s)
                await s.finished()  # forever, unless --idle-timeout or a signal
                nursery.cancel_scope.cancel()
        finally:
            if args.scheduler_file:
                try:
                    os.remove(args.scheduler_file)
                except OSError:
                    pass


async def _close_on_signal(scheduler: Any) -> None:
    """The first SIGINT/SIGTERM closes the scheduler in order (its workers too, as dask's
    do); a second one finds ``run_until_signal``'s handler again and cancels outright."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            logger.info("%s received: closing the scheduler", signal.Signals(signum).name)
            break
    await scheduler.close()


def contact_address(address: str) -> str:
    """The address others should use: a wildcard bind (0.0.0.0) becomes this host's IP."""
    from trioscheduler.wire import parse_address
    from trioscheduler.wire.address import tcp_address

    scheme, host, port = parse_address(address)
    if scheme not in ("tcp", "tls") or host not in ("0.0.0.0", "::") or port is None:
        return address
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("8.8.8.8", 80))  # UDP: picks the outward interface, sends nothing
            return tcp_address(str(probe.getsockname()[0]), port, scheme)
    except OSError:
        return tcp_address(socket.gethostname(), port, scheme)


def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


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

    from trioscheduler.client.as_completed import as_completed
    from trioscheduler.client.client import Client
    from trioscheduler.deploy.cluster import LocalCluster

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
            if client.dashboard_link:
                print(f"  dashboard: {client.dashboard_link}", file=out, flush=True)

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trioscheduler",
        description="A distributed task scheduler with the API of dask.distributed, on trio.",
    )
    parser.add_argument(
        "--log-level", default=None, help="logging level (default: info; demo: warning)"
    )
    from trioscheduler._version import __version__

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
    p.add_argument(
        "--recover-from",
        metavar="LOG",
        help="keep the event log in LOG across restarts: started with an existing LOG, the "
        "scheduler rebuilds its tasks and clients' wishes from it (docs/recovery.md)",
    )
    p.add_argument(
        "--log-fsync-interval",
        type=_fsync_interval,
        default=1.0,
        help="fsync the --recover-from/--record log at most this often, in seconds (0: after "
        "every write; 'never': leave it to the OS). Default 1",
    )
    p.add_argument(
        "--recovery-grace",
        type=parse_seconds,
        default=60.0,
        help="after recovering, how long workers and clients have to come back (default 60 s)",
    )
    p.add_argument("--interface", help="network interface to listen on (e.g. eth0), instead of --host")
    p.add_argument("--protocol", choices=("tcp", "tls"), default="tcp", help="protocol to listen on")
    p.add_argument(
        "--idle-timeout",
        type=parse_seconds,
        help="close after this long with no work (e.g. '1 hour')",
    )
    p.add_argument(
        "--preload",
        action="append",
        default=[],
        help="module or .py file run in the scheduler: dask_setup(scheduler) / dask_teardown",
    )
    p.add_argument("--pid-file", help="write the process id to this file (removed at exit)")
    p.add_argument(
        "--close-workers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="on an orderly stop (SIGTERM, Ctrl-C, --idle-timeout) tell the workers and their "
        "nannies to close, as dask's scheduler does (default without --recover-from); "
        "--no-close-workers leaves them redialling for their --death-timeout, for a scheduler "
        "restarted on purpose (default with --recover-from)",
    )
    tls_arguments(p)
    from trioscheduler.http import DEFAULT_DASHBOARD_ADDRESS

    p.add_argument(
        "--dashboard-address",
        default=DEFAULT_DASHBOARD_ADDRESS,
        help="where the dashboard listens: ':PORT' (this scheduler's host), 'HOST:PORT', "
        "0 for any free port (default :8787; off without the 'dashboard' extra)",
    )
    p.add_argument(
        "--dashboard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serve the dashboard (--no-dashboard: do not)",
    )

    add_worker_arguments(
        sub.add_parser("worker", help="run a worker (under a nanny by default)")
    )

    from trioscheduler.cli import ssh as ssh_command

    ssh_command.add_arguments(
        sub.add_parser("ssh", help="start a scheduler and workers on other hosts over SSH")
    )

    p = sub.add_parser("demo", help="start a local cluster and run a demo workload on it")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: by cores)")
    p.add_argument("--threads", type=int, default=None, help="threads per worker")
    p.add_argument("--tasks", type=int, default=2000, help="tasks in the futures workload")
    p.add_argument(
        "--no-processes", action="store_true", help="everything in this process (inproc://)"
    )
    p = sub.add_parser(
        "pack-env",
        help="pack a venv (or conda-pack style prefix) for Client.upload_environment",
    )
    p.add_argument("env", help="the environment's directory")
    p.add_argument("-o", "--output", required=True, help="the archive to write (.tar.gz)")
    return parser


def _pack_env(args: argparse.Namespace) -> int:
    from trioscheduler.environments import archive
    from trioscheduler.environments.errors import EnvironmentArchiveError

    if not args.output.endswith(archive.SUFFIXES):
        print(f"pack-env: the output must end in {' or '.join(archive.SUFFIXES)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        env_id = archive.pack(args.env, args.output)
    except EnvironmentArchiveError as exc:
        print(f"pack-env: {exc}", file=sys.stderr)
        return 1
    size = os.path.getsize(args.output)
    print(
        f"{args.output}: {size / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s; "
        f"environment id {env_id}"
    )
    return 0


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
    configure_logging(level)
    if args.command == "pack-env":
        return _pack_env(args)
    if args.command == "demo":
        try:
            return _demo(args)
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130
    if args.command == "ssh":
        from trioscheduler.cli.ssh import run as command
    else:
        command = _scheduler_main if args.command == "scheduler" else run_worker
        tune_collector()
    try:
        trio.run(run_until_signal, lambda: command(args), instruments=busy_poll.install())
    except KeyboardInterrupt:  # a signal that arrived before the handler was installed
        return 130
    except Exception as exc:
        logger.error("%s failed: %s", args.command, describe(exc))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
