"""SSH deployment: how long a cluster takes to start over SSH, compute, and close.

``ssh-cluster-cycle``: seconds from ``SSHCluster([...])`` to a closed cluster, for a
scheduler and two single-threaded workers (under nannies) on this machine through a
private OpenSSH ``sshd`` on 127.0.0.1 (a throwaway host key and client key, started for
the run and stopped after it), with one task computed through a ``Client`` in between:
ours against ``distributed.SSHCluster``. Both start the remote Python processes the same
way (one SSH session each); the figure is dominated by interpreter start-up and imports
on the "hosts". Needs ``/usr/sbin/sshd`` and asyncssh (the ``ssh`` extra).

``ssh-cluster-cycle-tls``: the same cycle of ours with ``security=True`` (a temporary CA
made, shipped to each process over SSH, every connection mutual TLS) against ours
without: the ratio is what TLS costs a cluster's life. (dask's ``SSHCluster`` ships no
certificates: its hosts need their own files.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from benchmarks._harness import register

SSHD = "/usr/sbin/sshd"


def _source_root() -> str:
    import trioscheduler

    return str(Path(trioscheduler.__file__).parents[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@lru_cache(maxsize=1)
def _sshd() -> dict[str, Any]:
    """A private sshd on 127.0.0.1 for this benchmark run; stopped at interpreter exit."""
    import atexit

    if not os.path.exists(SSHD):
        raise RuntimeError("ssh benchmarks need OpenSSH's sshd (apt-get install openssh-server)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-sshd-"))
    for name in ("host_key", "client_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / name)], check=True
        )
    (tmp / "authorized_keys").write_text((tmp / "client_key.pub").read_text())
    port = _free_port()
    (tmp / "sshd.conf").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {tmp / 'host_key'}\n"
        f"AuthorizedKeysFile {tmp / 'authorized_keys'}\nPidFile none\nUsePAM no\n"
        "StrictModes no\nPasswordAuthentication no\nPermitRootLogin prohibit-password\n"
        f"SetEnv PYTHONPATH={_source_root()}\n"  # the "hosts" run the code measured here
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    proc = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(tmp / "sshd.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def stop() -> None:
        proc.terminate()
        proc.wait(timeout=10)

    atexit.register(stop)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the benchmark's sshd did not start") from None
            time.sleep(0.05)
    import getpass

    return {
        "port": port,
        "known_hosts": None,
        "username": getpass.getuser(),
        "client_keys": [str(tmp / "client_key")],
    }


def _cycle(make: Callable[..., Any], client_cls: Any, **kwargs: Any) -> float:
    start = time.perf_counter()
    with make(
        ["127.0.0.1"] * 3,
        connect_options=_sshd(),
        worker_options={"nthreads": 1},
        scheduler_options={"port": 0},
        **kwargs,
    ) as cluster:
        with client_cls(cluster) as client:
            assert client.submit(sum, [1, 2]).result() == 3  # a builtin: no import
    return time.perf_counter() - start


def ours(quick: bool, security: bool = False) -> float:
    from trioscheduler import Client, SSHCluster

    return _cycle(SSHCluster, Client, **({"security": True} if security else {}))


def reference(quick: bool) -> float:
    from distributed import Client, SSHCluster

    def make(*args: Any, **kwargs: Any) -> Any:
        kwargs["scheduler_options"] = {**kwargs["scheduler_options"], "dashboard_address": None}
        return SSHCluster(*args, **kwargs)

    return _cycle(make, Client)


register(
    "ssh-cluster-cycle",
    description=(
        "Start a scheduler and 2 nanny workers over SSH (private sshd on 127.0.0.1), "
        "compute one task, close (s): ours against distributed.SSHCluster."
    ),
    unit="s",
    ours=ours,
    reference=reference,
    reference_label="distributed.SSHCluster",
    higher_is_better=False,
)
register(
    "ssh-cluster-cycle-tls",
    description=(
        "The same cycle with SSHCluster(security=True) (temporary CA shipped over SSH, "
        "mutual TLS everywhere) against ours without (s; ratio = what TLS costs)."
    ),
    unit="s",
    ours=lambda quick: ours(quick, security=True),
    reference=ours,
    reference_label="ours, plain tcp",
    higher_is_better=False,
)
