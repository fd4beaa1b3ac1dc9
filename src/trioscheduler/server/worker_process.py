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
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import trio

from trioscheduler.server.collector import tune_collector
from trioscheduler.wire import busy_poll
from trioscheduler.wire.address import default_host, tcp_address

__all__ = [
    "START_METHOD_ENV",
    "add_arguments",
    "cancel_on_stdin_eof",
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


def parse_nworkers(text: str) -> int | str:
    if text == "auto":
        return "auto"
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--nworkers takes a positive number or 'auto', not {text!r}"
        ) from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--nworkers must be at least 1, not {n}")
    return n


def auto_nworkers(cores: int) -> tuple[int, int]:
    """``(processes, threads each)`` for ``--nworkers auto``: every core used, about
    sqrt(cores) processes (all of them up to 4 cores), the smallest divisor of ``cores``
    not below its square root, so each process gets the same number of threads."""
    cores = max(1, cores)
    if cores <= 4:
        return cores, 1
    processes = min(d for d in range(1, cores + 1) if cores % d == 0 and d * d >= cores)
    return processes, cores // processes


def parse_ports(text: str) -> list[int]:
    """``"9000"`` or ``"9000:9010"`` (inclusive) as a list of ports."""
    first, sep, last = text.partition(":")
    try:
        lo = int(first)
        hi = int(last) if sep else lo
    except ValueError:
        raise argparse.ArgumentTypeError(f"port {text!r} is not N or FIRST:LAST") from None
    if not (0 <= lo <= hi <= 65535):
        raise argparse.ArgumentTypeError(f"port range {text!r} is not within 0..65535")
    return list(range(lo, hi + 1))


def parse_seconds(text: str) -> float:
    """A duration: seconds (``90``) or dask's words (``"1 hour"``, ``"5m"``)."""
    try:
        value = float(text)
    except ValueError:
        from dask.utils import parse_timedelta

        try:
            value = float(parse_timedelta(text, default="seconds"))
        except (KeyError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a duration ({exc})") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a duration cannot be negative, got {text!r}")
    return value


def interface_host(name: str) -> str:
    """The IPv4 address of network interface ``name`` (``--interface``)."""
    import socket

    import psutil

    addrs = psutil.net_if_addrs()
    if name not in addrs:
        raise SystemExit(
            f"trioscheduler: no network interface {name!r}; this host has {', '.join(sorted(addrs))}"
        )
    for a in addrs[name]:
        if a.family == socket.AF_INET:
            return str(a.address)
    raise SystemExit(f"trioscheduler: network interface {name!r} has no IPv4 address")


def ports_for(ports: list[int] | None, n: int, option: str) -> list[int]:
    """One port per process: 0 (any) without ``option``; ``FIRST:LAST`` must cover ``n``."""
    if not ports:
        return [0] * n
    if len(ports) == 1 and n == 1:
        return ports
    if len(ports) < n:
        raise SystemExit(
            f"trioscheduler worker: {option} gives {len(ports)} port(s) for {n} workers; "
            f"give a range FIRST:LAST with at least {n} ports"
        )
    return ports[:n]


@contextlib.contextmanager
def pid_file(path: str | None) -> Iterator[None]:
    """``--pid-file``: this process's id in ``path`` while it runs."""
    if path is None:
        yield
        return
    with open(path, "w") as f:
        f.write(f"{os.getpid()}\n")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)


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
    p.add_argument(
        "--nworkers",
        type=parse_nworkers,
        default=1,
        help="worker processes to start, or 'auto' (by the cores, as dask: about sqrt(cores) "
        "processes of several threads)",
    )
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
    p.add_argument("--interface", help="network interface to serve on (e.g. eth0), instead of --host")
    p.add_argument(
        "--protocol", choices=("tcp", "tls"), help="protocol to serve on (tls with --tls-*; the scheduler's otherwise)"
    )
    p.add_argument(
        "--worker-port",
        type=parse_ports,
        help="port(s) workers serve data on: N, or FIRST:LAST for one port per worker",
    )
    p.add_argument(
        "--nanny-port", type=parse_ports, help="port(s) nannies listen on: N or FIRST:LAST"
    )
    p.add_argument("--listen-address", help="address the worker listens on (one worker)")
    p.add_argument(
        "--contact-address",
        help="address the worker tells the scheduler and peers to use (behind NAT; one worker)",
    )
    p.add_argument(
        "--preload",
        action="append",
        default=[],
        help="module or .py file run in each worker: dask_setup(worker) / dask_teardown(worker)",
    )
    p.add_argument(
        "--preload-nanny",
        action="append",
        default=[],
        help="module or .py file run in each nanny: dask_setup(nanny) / dask_teardown(nanny)",
    )
    p.add_argument(
        "--death-timeout",
        type=parse_seconds,
        help="seconds to wait for the scheduler before giving up, at start and after losing it "
        "(default: 10 s to connect, 60 s to rejoin)",
    )
    p.add_argument(
        "--record",
        metavar="PATH",
        help="log every event of the worker core to PATH (PATH-0, PATH-1... with --nworkers)",
    )
    p.add_argument(
        "--lifetime", type=parse_seconds, help="retire the worker after this long (e.g. '1 hour')"
    )
    p.add_argument(
        "--lifetime-stagger",
        type=parse_seconds,
        default=0.0,
        help="spread lifetimes by up to this much either way, so workers do not all leave at once",
    )
    p.add_argument(
        "--lifetime-restart",
        action="store_true",
        help="start a new worker when one reaches its lifetime (needs the nanny)",
    )
    p.add_argument("--pid-file", help="write the process id to this file (removed at exit)")
    tls_arguments(p)
    p.add_argument(
        "--env-cache-dir",
        help="where shipped environments are unpacked, shared by this user's nannies on the "
        "host (default: $TRIOSCHEDULER_ENV_CACHE, else ~/.cache/trioscheduler/envs)",
    )
    p.add_argument(
        "--env-cache-max-count",
        help="keep at most this many shipped environments in the host cache, least recently "
        "used go first, never one in use (default: $TRIOSCHEDULER_ENV_CACHE_MAX_COUNT, else 10; "
        "0: no bound)",
    )
    p.add_argument(
        "--env-cache-max-size",
        help="and at most this many bytes, e.g. '20GiB' (default: "
        "$TRIOSCHEDULER_ENV_CACHE_MAX_SIZE, else 20GiB; 0: no bound)",
    )
    p.add_argument(
        "--python",
        help="run the worker under this interpreter instead of the nanny's (needs the nanny; "
        "shipped venvs are re-based onto its base interpreter)",
    )
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--watch-stdin", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--nanny-address", help=argparse.SUPPRESS)


def tls_arguments(p: argparse.ArgumentParser) -> None:
    """dask's ``--tls-ca-file --tls-cert --tls-key`` (scheduler and worker commands)."""
    p.add_argument("--tls-ca-file", help="CA certificate(s): peers must present one it signed")
    p.add_argument("--tls-cert", help="this process's certificate (PEM); turns TLS on (tls://)")
    p.add_argument("--tls-key", help="the private key of --tls-cert (PEM)")


def security_from_args(args: argparse.Namespace, role: str) -> Any:
    """``--tls-*`` as a ``Security`` for ``role`` (as dask's CLI), or None without them."""
    if not any([args.tls_ca_file, args.tls_cert, args.tls_key]):
        return None
    if not args.tls_ca_file or not args.tls_cert:
        raise SystemExit(
            f"trioscheduler {args.command}: TLS needs --tls-ca-file and --tls-cert "
            "(and --tls-key unless the key is in the cert file)"
        )
    from trioscheduler.wire.security import Security

    return Security(
        require_encryption=True,
        tls_ca_file=args.tls_ca_file,
        **{f"tls_{role}_cert": args.tls_cert, f"tls_{role}_key": args.tls_key},
    )


_parser: argparse.ArgumentParser | None = None


def parser() -> argparse.ArgumentParser:
    """The parser of a nanny child's command line (``--log-level L worker ...``), built
    once per process. A nanny builds it before it forks, so a forked worker only parses
    (building one in a fresh process costs a few ms)."""
    global _parser
    if _parser is None:
        # Built whole, then published: two nannies' fork threads call this at once, and
        # one that saw a half-built parser forked a child without the 'worker' command.
        built = argparse.ArgumentParser(prog="trioscheduler")
        built.add_argument("--log-level", default="info")
        sub = built.add_subparsers(dest="command", required=True)
        add_arguments(sub.add_parser("worker"))
        _parser = built
    return _parser


def main(argv: Sequence[str]) -> int:
    """A nanny's forked child: run the worker its command line describes; the exit code."""
    args = parser().parse_args(argv)
    configure_logging(args.log_level)
    tune_collector()
    try:
        trio.run(run_until_signal, lambda: run(args), instruments=busy_poll.install())
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
    with pid_file(args.pid_file):
        await _run(args)


async def _run(args: argparse.Namespace) -> None:
    address = _scheduler_address(args)
    if args.nworkers == "auto":
        nworkers, auto_threads = auto_nworkers(os.cpu_count() or 1)
    else:
        nworkers, auto_threads = max(1, args.nworkers), 0
    nthreads = args.nthreads or auto_threads or max(1, (os.cpu_count() or 1) // nworkers)
    if nworkers > 1 and (args.listen_address or args.contact_address):
        raise SystemExit(
            "trioscheduler worker: --listen-address and --contact-address name one worker; "
            "leave them out with --nworkers > 1"
        )
    if args.lifetime_restart and not (args.nanny or args.nanny_address):
        raise SystemExit("trioscheduler worker: --lifetime-restart needs the nanny (drop --no-nanny)")
    if args.python and not args.nanny:
        raise SystemExit("trioscheduler worker: --python needs the nanny (drop --no-nanny)")
    host = interface_host(args.interface) if args.interface else args.host
    worker_ports = ports_for(args.worker_port, nworkers, "--worker-port")
    nanny_ports = ports_for(args.nanny_port, nworkers, "--nanny-port")
    common: dict[str, Any] = dict(
        nthreads=nthreads,
        memory_limit=args.memory_limit,
        resources=args.resources,
        local_directory=args.local_directory,
        nworkers=nworkers,
        preload=args.preload,
        lifetime=args.lifetime,
        lifetime_stagger=args.lifetime_stagger,
        lifetime_restart=args.lifetime_restart,
        security=security_from_args(args, "worker"),
    )
    if args.death_timeout is not None:
        common["death_timeout"] = args.death_timeout
    names = [
        None if args.name is None else (args.name if nworkers == 1 else f"{args.name}-{i}")
        for i in range(nworkers)
    ]
    records = [
        None if args.record is None else (args.record if nworkers == 1 else f"{args.record}-{i}")
        for i in range(nworkers)
    ]
    if args.nanny:
        from trioscheduler.server.nanny import Nanny

        method = args.start_method or os.environ.get(START_METHOD_ENV) or "spawn"

        def make(i: int, name: str | None) -> Any:
            return Nanny(
                address,
                name=name,
                host=host,
                start_method=method,
                port=nanny_ports[i],
                worker_port=worker_ports[i],
                preload_nanny=args.preload_nanny,
                worker_listen_address=args.listen_address,
                worker_contact_address=args.contact_address,
                env_cache_dir=args.env_cache_dir,
                env_cache_max_count=args.env_cache_max_count or "default",
                env_cache_max_size=args.env_cache_max_size or "default",
                python=args.python,
                record=records[i],
                **common,
            )
    else:
        from trioscheduler.server.worker import Worker

        scheme = "tls" if common["security"] is not None else "tcp"
        if args.preload_nanny:
            raise SystemExit("trioscheduler worker: --preload-nanny needs the nanny")
        death_timeout = common.pop("death_timeout", None)
        if death_timeout is not None:  # to connect at start, and to rejoin a lost scheduler
            common["connect_timeout"] = death_timeout
            common["death_timeout"] = death_timeout

        def listen_at(i: int) -> str | None:
            if args.listen_address:
                return str(args.listen_address)
            if address.startswith("inproc://"):
                return None
            return tcp_address(host or default_host(address), worker_ports[i], scheme)

        def make(i: int, name: str | None) -> Any:
            return Worker(
                address,
                address=listen_at(i),
                contact_address=args.contact_address,
                name=name,
                nanny=args.nanny_address,
                record=records[i],
                **common,
            )

    components: list[Any] = [None] * nworkers
    ready = ReadyPipe(args.ready_fd)
    async with trio.open_nursery() as nursery:
        if args.watch_stdin:
            nursery.start_soon(cancel_on_stdin_eof, nursery.cancel_scope)
        async with trio.open_nursery() as starters:  # all start (and later stop) at once
            for i, name in enumerate(names):
                starters.start_soon(_start_into, nursery, make(i, name), components, i)
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
            # A worker past its ``lifetime`` with ``lifetime_restart`` asks its nanny for a new one.
            restart = any(getattr(c, "restart_after_close", False) for c in components)
            ready.write(f"{'restart' if restart else 'closing'} {reasons}\n")
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


async def cancel_on_stdin_eof(
    scope: trio.CancelScope,
    why: str = "the nanny is gone (stdin closed)",
    level: int = logging.WARNING,
) -> None:
    """Whoever started us (a nanny, an SSH client) holds our stdin open; EOF means it is
    gone, so we go too: ``scope`` is cancelled, saying ``why``."""
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stream:
        while await stream.receive_some(4096):
            pass
    logger.log(level, "%s: shutting down", why)
    scope.cancel()
