"""The process ``SSHCluster`` starts on a remote host: ``python -m trioscheduler.deploy.spawn``.

``scheduler --options JSON`` runs a ``Scheduler``; ``worker SCHEDULER --options JSON``
runs ``n_workers`` (default 1) of ``worker_class`` (``Nanny`` by default). The options
are the keyword arguments of ``SSHCluster(scheduler_options=, worker_options=)`` as JSON,
given to the class as they are, so an unknown keyword fails here, and that error reaches
the user (this process prints it, the cluster raises it).

The first line on stdin is the setup (``remote_setup``): the client's dask config and,
for a cluster with ``security=``, its certificates (then everything here is ``tls://``).
Each started component prints one line ``trioscheduler-spawn {"address": ...}`` on stdout.
The process lives as long as its stdin is open: SSH closes it when the connection drops,
whether the cluster closed or the client process was killed, so nothing outlives the
client. SIGINT/SIGTERM end it too. Exits 0 after an orderly shutdown, 1 on a failure.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import traceback
from typing import Any

import trio

from trioscheduler import wire
from trioscheduler.deploy import remote_setup
from trioscheduler.server.worker_process import (
    cancel_on_stdin_eof,
    configure_logging,
    run_until_signal,
)
from trioscheduler.wire import busy_poll
from trioscheduler.wire.security import Security, default_scheme

MARK = "trioscheduler-spawn "
ERROR_MARK = "trioscheduler-spawn-error "
logger = logging.getLogger("trioscheduler.spawn")

# dask's names for the classes, so ``worker_class="distributed.Nanny"`` (dask's default)
# means ours.
_CLASSES = {
    "distributed.Nanny": "trioscheduler.server.nanny.Nanny",
    "distributed.Worker": "trioscheduler.server.worker.Worker",
    "trioscheduler.Nanny": "trioscheduler.server.nanny.Nanny",
    "trioscheduler.Worker": "trioscheduler.server.worker.Worker",
}


def worker_class(path: str) -> type:
    """``"distributed.Nanny"`` or ``"package.module.Class"`` as a class."""
    path = _CLASSES.get(path, path)
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"worker_class={path!r}: give a dotted path like 'trioscheduler.Nanny'")
    cls = getattr(importlib.import_module(module), name, None)
    if not isinstance(cls, type):
        raise ValueError(f"worker_class={path!r}: {module} has no class {name}")
    return cls


def _announce(address: str) -> None:
    print(MARK + json.dumps({"address": address}), flush=True)


async def _scheduler(options: dict[str, Any], security: Security | None) -> None:
    from trioscheduler.server.scheduler import Scheduler
    from trioscheduler.wire.address import tcp_address

    options = dict(options)
    address = options.pop("address", None)
    host = options.pop("host", "127.0.0.1")
    port = options.pop("port", 8786)
    protocol = str(options.pop("protocol", default_scheme(security))).removesuffix("://")
    if address is None:
        address = tcp_address(host, port, protocol)
    if security is not None:
        options["security"] = security
    async with Scheduler(address, **options) as scheduler:
        _announce(scheduler.address)
        await scheduler.finished()


async def _workers(
    scheduler_address: str, options: dict[str, Any], cls_path: str, security: Security | None
) -> None:
    from trioscheduler.server.nanny import Nanny
    from trioscheduler.server.worker import Worker

    cls = worker_class(cls_path)
    options = dict(options)
    n = int(options.pop("n_workers", 1))
    if n < 1:
        raise ValueError(f"worker_options n_workers={n}: must be at least 1")
    host = options.pop("host", None)
    name = options.pop("name", None)
    if issubclass(cls, Nanny):
        if host is not None:
            options["host"] = host
    elif issubclass(cls, Worker) and host is not None and "address" not in options:
        options["address"] = f"{default_scheme(security)}://{host}:0"
    if security is not None:
        options["security"] = security

    def make(i: int) -> Any:
        kwargs = dict(options)
        if name is not None:
            kwargs["name"] = name if n == 1 else f"{name}-{i}"
        return cls(scheduler_address, **kwargs)

    components: list[Any] = [None] * n
    async with trio.open_nursery() as nursery:

        async def hold(i: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            async with make(i) as component:
                components[i] = component
                task_status.started()
                await component.finished()

        async with trio.open_nursery() as starters:  # all start at once
            for i in range(n):
                starters.start_soon(nursery.start, hold, i)
        for c in components:
            _announce(getattr(c, "worker_address", None) or c.address)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trioscheduler.deploy.spawn")
    p.add_argument("kind", choices=("scheduler", "worker"))
    p.add_argument("scheduler_address", nargs="?")
    p.add_argument("--options", default="{}", help="keyword arguments as a JSON object")
    p.add_argument("--worker-class", default="distributed.Nanny")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    configure_logging(args.log_level)
    options = json.loads(args.options)
    if not isinstance(options, dict):
        p.error("--options must be a JSON object")
    try:
        security = remote_setup.unpack(remote_setup.read_line(sys.stdin.fileno()))
    except Exception as exc:
        print(ERROR_MARK + json.dumps(f"the setup line: {type(exc).__name__}: {exc}"), flush=True)
        return 1

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                cancel_on_stdin_eof,
                nursery.cancel_scope,
                "stdin closed (the SSH client is gone)",
                logging.INFO,
            )
            if args.kind == "scheduler":
                await _scheduler(options, security)
            else:
                if not args.scheduler_address:
                    p.error("worker needs the scheduler's address")
                await _workers(args.scheduler_address, options, args.worker_class, security)
            nursery.cancel_scope.cancel()

    try:
        trio.run(run_until_signal, run, instruments=busy_poll.install())
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # reported to the SSH client, which raises it
        exc = wire.sole_error(exc)
        if isinstance(exc, SystemExit):
            return int(exc.code or 0)
        traceback.print_exception(exc, file=sys.stderr)
        print(ERROR_MARK + json.dumps(f"{type(exc).__name__}: {exc}"), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
