"""``trioscheduler ssh HOST...``: a cluster over SSH from the command line, as ``dask ssh``.

The scheduler runs on ``--scheduler`` (default: the first host), workers on every host
given (the scheduler's too, as ``dask ssh`` does). The command holds the SSH connections
until Ctrl-C / SIGTERM, or until the scheduler's process ends; then everything it
started stops. It is ``SSHCluster`` underneath.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

logger = logging.getLogger("trioscheduler.cli")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("hostnames", nargs="*", help="hosts to run workers on")
    p.add_argument("--hostfile", help="a file with one host per line (added to the hostnames)")
    p.add_argument("--scheduler", help="host to run the scheduler on (default: the first host)")
    p.add_argument("--scheduler-port", type=int, default=8786, help="the scheduler's port")
    p.add_argument("--nthreads", type=int, default=None, help="threads per worker")
    p.add_argument("--nworkers", type=int, default=1, help="workers per host")
    p.add_argument("--memory-limit", default="auto", help="bytes per worker ('4GB', 'auto')")
    p.add_argument("--worker-port", type=int, default=None, help="first worker port (nanny only)")
    p.add_argument("--nanny-port", type=int, default=None, help="first nanny port")
    p.add_argument(
        "--nanny", action=argparse.BooleanOptionalAction, default=True,
        help="start each worker under a nanny (default) or as a bare worker",
    )  # fmt: skip
    p.add_argument("--local-directory", help="workers' scratch directory on the hosts")
    p.add_argument("--remote-python", help="python on the hosts (default: this one's path)")
    p.add_argument("--ssh-username", help="user to log in as (default: SSH's choice)")
    p.add_argument("--ssh-port", type=int, default=22, help="SSH port")
    p.add_argument("--ssh-private-key", help="private key file (default: SSH's choice)")
    p.add_argument(
        "--tls-ca-file",
        help="CA certificate: with --tls-cert (and --tls-key) the cluster speaks tls://, "
        "every process presenting that certificate; the files are shipped over SSH",
    )
    p.add_argument("--tls-cert", help="the cluster's certificate (PEM)")
    p.add_argument("--tls-key", help="the private key of --tls-cert (PEM)")
    p.add_argument(
        "--known-hosts",
        help="known_hosts file to check host keys against, or 'none' to accept any host "
        "key (default: ~/.ssh/known_hosts)",
    )


def cluster_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """``SSHCluster`` keyword arguments from the command line."""
    hosts = list(args.hostnames)
    if args.hostfile:
        with open(args.hostfile) as f:
            hosts += [line.strip() for line in f if line.strip() and not line.startswith("#")]
    if not hosts:
        raise SystemExit("trioscheduler ssh: give at least one host (or --hostfile)")
    scheduler = args.scheduler or hosts[0]
    connect: dict[str, Any] = {"port": args.ssh_port}
    if args.ssh_username:
        connect["username"] = args.ssh_username
    if args.ssh_private_key:
        connect["client_keys"] = [args.ssh_private_key]
    if args.known_hosts:
        connect["known_hosts"] = None if args.known_hosts.lower() == "none" else args.known_hosts
    workers: dict[str, Any] = {"n_workers": args.nworkers, "memory_limit": args.memory_limit}
    if args.nthreads is not None:
        workers["nthreads"] = args.nthreads
    if args.local_directory:
        workers["local_directory"] = args.local_directory
    if args.nanny_port is not None or args.worker_port is not None:
        if not args.nanny:
            raise SystemExit("trioscheduler ssh: --worker-port/--nanny-port need --nanny")
        if args.nworkers > 1:
            raise SystemExit("trioscheduler ssh: fixed ports need --nworkers 1")
        if args.nanny_port is not None:
            workers["port"] = args.nanny_port
        if args.worker_port is not None:
            workers["worker_port"] = args.worker_port
    return dict(
        security=_security(args),
        hosts=[scheduler, *hosts],
        connect_options=connect,
        worker_options=workers,
        scheduler_options={"port": args.scheduler_port},
        worker_class="trioscheduler.Nanny" if args.nanny else "trioscheduler.Worker",
        remote_python=args.remote_python,
    )


def _security(args: argparse.Namespace) -> Any:
    """``--tls-*`` as one ``Security`` whose every role presents the same certificate."""
    if not any([args.tls_ca_file, args.tls_cert, args.tls_key]):
        return None
    if not args.tls_ca_file or not args.tls_cert:
        raise SystemExit("trioscheduler ssh: TLS needs --tls-ca-file and --tls-cert")
    from trioscheduler.wire.security import ROLES, Security

    fields = {f"tls_{role}_cert": args.tls_cert for role in ROLES}
    fields |= {f"tls_{role}_key": args.tls_key for role in ROLES}
    return Security(require_encryption=True, tls_ca_file=args.tls_ca_file, **fields)


async def run(args: argparse.Namespace) -> None:
    from trioscheduler.deploy.ssh import SSHCluster

    async with SSHCluster(**cluster_arguments(args), asynchronous=True) as cluster:
        print(f"trioscheduler scheduler at {cluster.scheduler_address}", flush=True)
        for address in cluster.worker_addresses:
            print(f"trioscheduler worker at {address}", flush=True)
        await cluster.finished()
        logger.info("the scheduler's process ended: closing")
