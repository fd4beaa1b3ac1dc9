"""SSHCluster's argument checks and errors that need no SSH server (the cluster itself is
tested against OpenSSH in network namespaces, tests/test_ssh.py)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

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
    with pytest.raises(TypeError, match="give security= to SSHCluster itself"):
        SSHCluster(["a", "b"], worker_options={"security": True})


def test_the_setup_line_carries_certificate_files_as_text_and_json_config(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What a remote process gets on stdin: PEM text (a path on this machine means nothing
    on the hosts), and the config JSON can carry (the warning names what it cannot)."""
    import json

    from trioscheduler import Security
    from trioscheduler.deploy import remote_setup

    temporary = Security.temporary()
    ca = tmp_path / "ca.pem"
    ca.write_text(temporary.tls_ca_file or "")
    security = Security(**{**temporary.to_dict(), "tls_ca_file": str(ca)})
    config = {"a": {"b": 1}, "scheduler": print, "x": {"fn": print}}
    with caplog.at_level("WARNING", logger="trioscheduler.ssh"):
        line = remote_setup.pack(security, config)
    assert [r.getMessage().rsplit(": ", 1)[1] for r in caplog.records] == ["x.fn"]
    setup = json.loads(line)
    assert setup["config"] == {"a": {"b": 1}, "x": {}}
    assert setup["security"]["tls_ca_file"] == temporary.tls_ca_file
    assert Security(**setup["security"]).get_connection_args("client")["ssl_context"]
    with pytest.raises(ValueError, match="cannot read tls_ca_file='/no/such.pem'"):
        remote_setup.pack(Security(**{**temporary.to_dict(), "tls_ca_file": "/no/such.pem"}), {})


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
    assert kwargs["security"] is None
    tls = ["ssh", "h1", "--tls-ca-file", "ca.pem", "--tls-cert", "c.pem", "--tls-key", "k.pem"]
    security = cluster_arguments(parser().parse_args(tls))["security"]
    assert security.require_encryption and security.tls_ca_file == "ca.pem"
    for role in ("client", "scheduler", "worker"):
        assert security.get_tls_config_for_role(role) | {"ciphers": None} == {
            "ca_file": "ca.pem", "cert": "c.pem", "key": "k.pem", "ciphers": None
        }
    with pytest.raises(SystemExit, match="needs --tls-ca-file and --tls-cert"):
        cluster_arguments(parser().parse_args(["ssh", "h1", "--tls-key", "k.pem"]))
    with pytest.raises(SystemExit, match="need --nanny"):
        cluster_arguments(parser().parse_args(["ssh", "h1", "--worker-port", "9000", "--no-nanny"]))
