"""SSHCluster's argument checks and errors that need no SSH server (the cluster itself is
tested against OpenSSH in network namespaces, tests/test_ssh.py)."""

from __future__ import annotations

import socket
import sys

import pytest
import trio

from trioscheduler import SSHCluster
from trioscheduler.cli.main import parser
from trioscheduler.cli.ssh import cluster_arguments
from trioscheduler.deploy.ssh import SSHClusterError


def test_without_asyncssh_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncssh", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'trioscheduler\[ssh\]'"):
        SSHCluster(["sched-host", "worker-host"])


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="hosts must be a non-empty list"):
        SSHCluster([])
    with pytest.raises(ValueError, match="one dict per host"):
        SSHCluster(["a", "b"], connect_options=[{}])
    with pytest.raises(ValueError, match="one path per host"):
        SSHCluster(["a", "b"], remote_python=["/usr/bin/python3"])
    with pytest.raises(TypeError, match="n_wrokers"):
        SSHCluster(["a", "b"], n_wrokers=2)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_host_fails_the_start_naming_it() -> None:
    port = _closed_port()
    with pytest.raises(
        SSHClusterError, match=r"cannot connect to '127\.0\.0\.1' for the scheduler"
    ):
        SSHCluster(["127.0.0.1", "127.0.0.1"], connect_options={"port": port})


async def test_an_unreachable_host_fails_an_async_start_too() -> None:
    cluster = SSHCluster(["127.0.0.1"], connect_options={"port": _closed_port()}, asynchronous=True)
    with trio.fail_after(30), pytest.raises(SSHClusterError, match="cannot connect"):
        async with cluster:
            pass
    assert cluster.status == "closed"


def test_the_ssh_command_line_maps_to_dask_meanings() -> None:
    args = parser().parse_args(
        ["ssh", "h1", "h2", "--nworkers", "2", "--nthreads", "3", "--ssh-username", "me",
         "--ssh-port", "2222", "--known-hosts", "none", "--no-nanny"]
    )  # fmt: skip
    kwargs = cluster_arguments(args)
    assert kwargs["hosts"] == ["h1", "h1", "h2"]  # scheduler on the first; workers on all
    assert kwargs["connect_options"] == {"port": 2222, "username": "me", "known_hosts": None}
    assert kwargs["worker_options"] == {"n_workers": 2, "nthreads": 3, "memory_limit": "auto"}
    assert kwargs["worker_class"] == "trioscheduler.Worker"
    assert kwargs["scheduler_options"] == {"port": 8786}
    with pytest.raises(SystemExit, match="need --nanny"):
        cluster_arguments(parser().parse_args(["ssh", "h1", "--worker-port", "9000", "--no-nanny"]))
