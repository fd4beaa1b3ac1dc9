"""Nothing a stranger sends is unpickled: one attack per process kind, on real sockets.

A header plus a pickle frame, sent *before* any hello, to the scheduler, a worker's data
server (a real worker process) and a nanny: the pickle would create a file if loaded.
It must not exist afterwards, and each process must go on serving its clients. Then the
same cluster with TLS: a peer without the cluster's certificate gets nowhere, with a
clear error on its side, and a CLI scheduler and worker started with --tls-* work.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from _wire_attack import pickle_before_hello
from trioscheduler import Client, LocalCluster, Nanny, Security
from trioscheduler.deploy.cluster import open_cluster
from trioscheduler.wire import ConnectError, connect, parse_address

TIMEOUT = 60
pytestmark = pytest.mark.slow


def inc(x: int) -> int:
    return x + 1


def pid() -> int:
    return os.getpid()


async def attack(address: str, marker: Path, via: str = "tcp") -> None:
    _, host, port = parse_address(address)
    assert port is not None
    await pickle_before_hello(host, port, marker, via)


@pytest.mark.parametrize("via", ["tcp", "unix"])  # unix: the same-host shortcut
@pytest.mark.parametrize("kind", ["scheduler", "worker", "nanny"])
async def test_pickle_before_hello_runs_nowhere(
    kind: str,
    via: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.WARNING, "trioscheduler.wire")
    marker = tmp_path / f"pwned-{kind}"
    with trio.fail_after(TIMEOUT):
        async with open_cluster(1, 1, processes=True, memory_limit=0) as cluster:
            nanny = cluster.workers["0"]
            assert isinstance(nanny, Nanny) and nanny.address and nanny.worker_address
            target = {
                "scheduler": cluster.scheduler_address,
                "worker": nanny.worker_address,
                "nanny": nanny.address,
            }[kind]
            await attack(target, marker, via)
            assert not marker.exists(), f"the {kind} unpickled a stranger's frame"
            async with Client(cluster, asynchronous=True) as c:
                if kind == "scheduler":  # over TCP, not the in-process alias
                    async with await connect(cluster.scheduler_address) as rpc:
                        await rpc.send({"op": "scheduler_info"})
                        info = await rpc.receive()
                    assert nanny.worker_address in info["result"]["workers"]
                    assert await c.submit(inc, 1) == 2
                elif kind == "worker":  # the data server: run goes there, gather too
                    assert await c.run(pid) == {nanny.worker_address: nanny.pid}
                    assert await c.gather(c.submit(inc, 41)) == 42
                else:  # the scheduler asks the nanny to restart its worker
                    old = nanny.pid
                    await c.restart()
                    assert nanny.pid != old
                    assert await c.submit(inc, 2) == 3
    assert not marker.exists()
    # the attack was logged, not run (a worker process logs to our stderr)
    logs = capfd.readouterr().err if kind == "worker" else caplog.text
    assert "not a trioscheduler peer" in logs


@pytest.fixture(scope="module")
def sec() -> Security:
    pytest.importorskip("cryptography")
    return Security.temporary()


async def test_tls_cluster_refuses_strangers_and_serves_its_clients(
    sec: Security, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    with trio.fail_after(TIMEOUT):
        async with open_cluster(2, 1, processes=True, memory_limit=0, security=sec) as cluster:
            assert cluster.scheduler_address.startswith("tls://")
            assert all(a.startswith("tls://") for a in cluster.worker_addresses)
            nanny = cluster.workers["0"]
            assert isinstance(nanny, Nanny) and nanny.address and nanny.address.startswith("tls://")
            for address in (cluster.scheduler_address, nanny.worker_address, nanny.address):
                assert address is not None
                await attack(address, marker)  # plain bytes on a TLS port
                with pytest.raises(ConnectError, match="accepts TLS only"):
                    await connect(address.replace("tls://", "tcp://"), timeout=5)
                with pytest.raises(ConnectError, match="TLS handshake failed"):
                    await connect(address, timeout=5, **_args(Security.temporary(), "client"))
            assert not marker.exists()
            async with Client(cluster, asynchronous=True) as c:
                # data moves between the worker processes over TLS
                a = c.submit(inc, 1, workers=[cluster.worker_addresses[0]])
                b = c.submit(inc, a, workers=[cluster.worker_addresses[1]])
                assert await b == 3
                assert sorted((await c.run(pid)).values()) == sorted(
                    w.pid for w in cluster.workers.values() if isinstance(w, Nanny)
                )


def _args(sec: Security, role: str) -> dict[str, Any]:
    args = sec.get_connection_args(role)
    args.pop("extra_conn_args")
    return args


def test_sync_client_with_wrong_certificate_gets_a_clear_error(sec: Security) -> None:
    with LocalCluster(1, 1, processes=False, security=sec) as cluster:
        assert cluster.scheduler_address.startswith("tls://")
        with Client(cluster) as c:  # takes the cluster's security
            assert c.submit(inc, 1).result() == 2
        # Another process's view: the address alone, and the wrong certificate.
        code = (
            "import sys; from trioscheduler import Client, Security\n"
            "try:\n"
            f"    Client({cluster.scheduler_address!r}, timeout=5, security=Security.temporary())\n"
            "except Exception as e:\n"
            "    print(type(e).__name__, e); sys.exit(3)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT
        )
        assert out.returncode == 3, out.stderr
        assert "ConnectError" in out.stdout and "TLS handshake failed" in out.stdout


def test_local_cluster_keywords_are_never_silently_dropped() -> None:
    with pytest.raises(ValueError, match="protocol='tls://'.*security"):
        LocalCluster(1, 1, processes=False, protocol="tls://")
    with pytest.raises(ValueError, match="dashboard_address"):
        LocalCluster(1, 1, processes=False, dashboard_address="no-such-address")
    with pytest.raises(ValueError, match="interface='no-such-nic'"):
        LocalCluster(1, 1, processes=False, interface="no-such-nic")
    with pytest.raises(TypeError, match="security="):
        LocalCluster(1, 1, processes=False, security="yes")
    with LocalCluster(1, 1, processes=False, protocol="tcp://", dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://")  # asked for tcp: not inproc


async def _read_address(proc: trio.Process, prefix: str) -> str:
    assert proc.stdout is not None
    buf = b""
    while b"\n" not in buf:
        chunk = await proc.stdout.receive_some()
        assert chunk, "the process exited before printing its address"
        buf += chunk
    line = buf.decode().splitlines()[0]
    assert line.startswith(prefix), line
    return line.split()[-1] if "(" not in line else line.split()[-4]


async def test_cli_scheduler_and_worker_with_tls_files(sec: Security, tmp_path: Path) -> None:
    files = {}
    for name, field in (("ca", "tls_ca_file"), ("cert", "tls_worker_cert"), ("key", "tls_worker_key")):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_text(getattr(sec, field))
    tls = ["--tls-ca-file", str(files["ca"]), "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"])]
    cmd = [sys.executable, "-m", "trioscheduler", "--log-level", "warning"]
    here = str(Path(__file__).parent)  # the worker unpickles this module's functions
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    pipe: dict[str, Any] = {"stdout": subprocess.PIPE, "check": False, "env": env}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            sched = await nursery.start(
                partial(trio.run_process, [*cmd, "scheduler", "--port", "0", *tls], **pipe)
            )
            address = await _read_address(sched, "trioscheduler scheduler at")
            assert address.startswith("tls://")
            worker = await nursery.start(
                partial(
                    trio.run_process,
                    [*cmd, "worker", address, "--nthreads", "1", "--memory-limit", "0", *tls],
                    **pipe,
                )
            )
            await _read_address(worker, "trioscheduler worker at tls://")
            async with Client(address, asynchronous=True, security=sec) as c:
                assert await c.submit(inc, 10) == 11
            with pytest.raises(ConnectError, match="accepts TLS only"):
                async with Client(address.replace("tls://", "tcp://"), asynchronous=True, timeout=5):
                    pass
            worker.terminate()
            sched.terminate()


async def test_silent_connections_cannot_exhaust_a_scheduler_process() -> None:
    """500 connections that say hello and then nothing (510 fds held forever, before):
    the scheduler process holds at most MAX_UNIDENTIFIED of them, and serves a client."""
    import psutil

    from _wire_attack import HELLO
    from trioscheduler.wire.endpoints import MAX_UNIDENTIFIED

    cmd = [sys.executable, "-m", "trioscheduler", "--log-level", "warning"]
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            sched = await nursery.start(
                partial(
                    trio.run_process,
                    [*cmd, "scheduler", "--port", "0"],
                    stdout=subprocess.PIPE,
                    check=False,
                )
            )
            address = await _read_address(sched, "trioscheduler scheduler at")
            proc = psutil.Process(sched.pid)
            before = proc.num_fds()
            _, host, port = parse_address(address)
            assert port is not None
            silent = []
            for _ in range(500):
                sock = await trio.open_tcp_stream(host, port)
                await sock.send_all(HELLO)
                silent.append(sock)
            async with Client(address, asynchronous=True, timeout=10) as c:
                info = await c.scheduler_info()
                assert info["address"] == address
            held = proc.num_fds() - before
            assert held <= MAX_UNIDENTIFIED + 10, held  # + the client's few connections
            for sock in silent:
                await sock.aclose()
            sched.terminate()


def nested_submit(x: int) -> int:
    from trioscheduler import get_client

    return int(get_client().submit(inc, x).result())


async def test_get_client_in_a_tls_worker_presents_the_worker_certificate(sec: Security) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_cluster(1, 2, processes=True, memory_limit=0, security=sec) as cluster:
            async with Client(cluster, asynchronous=True) as c:
                assert await c.submit(nested_submit, 41) == 42
