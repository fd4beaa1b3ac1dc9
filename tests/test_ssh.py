"""SSHCluster against real SSH servers: Debian's OpenSSH ``sshd`` runs in three network
namespaces of the lab (scheduler host and two worker hosts), the client in a fourth, with
a throwaway key pair made here (issue 18).

Needs root, iproute2 and ``/usr/sbin/sshd`` (``.ci/run`` installs openssh-server);
skipped, saying which, without them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

import test_netns
from test_netns import Lab

pytestmark = pytest.mark.slow
lab = test_netns.lab  # the fixture: four namespaces on a bridge

SSHD = "/usr/sbin/sshd"
HOSTS = ("sched", "a", "b")

CLIENT = """
import json, sys, time
from trioscheduler import Client, SSHCluster

hosts, key, mode = sys.argv[1:4], sys.argv[4], sys.argv[5]
options = {"known_hosts": None, "username": "root", "client_keys": [key]}
if mode == "close":  # a keyword the remote scheduler does not take: its error, here
    try:
        SSHCluster(hosts[:1], connect_options=options, scheduler_options={"bogus": 1})
    except Exception as exc:
        print("BAD-OPTION " + json.dumps(f"{type(exc).__name__}: {exc}"), flush=True)
    try:  # no such interpreter on the host: the shell's complaint, here
        SSHCluster(hosts[:1], connect_options=options, remote_python="/no/such/python")
    except Exception as exc:
        print("BAD-PYTHON " + json.dumps(f"{type(exc).__name__}: {exc}"), flush=True)
with SSHCluster(hosts, connect_options=options, worker_options={"nthreads": 2},
                scheduler_options={"port": 0}) as cluster:
    with Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        workers = sorted(client.scheduler_info()["workers"])
        x = client.submit(bytes, 1_000_000, workers=[workers[0]])
        y = client.submit(len, x, workers=[workers[1]])
        out = {"scheduler": cluster.scheduler_address, "workers": workers,
               "size": y.result(), "x_on": sorted(client.who_has(x)[x.key])}
        print("RESULT " + json.dumps(out), flush=True)
        if mode == "hang":
            time.sleep(3600)  # the test kills us with SIGKILL
print("CLOSED", flush=True)
"""

TLS_CLIENT = """
import json, os, sys, time
import dask
from trioscheduler import Client, Security, SSHCluster

hosts, key, ready, go = sys.argv[1:4], sys.argv[4], sys.argv[6], sys.argv[7]
options = {"known_hosts": None, "username": "root", "client_keys": [key]}
security = Security.temporary()
print("CA " + json.dumps(security.tls_ca_file), flush=True)

def answer():
    return dask.config.get("trioscheduler-test.answer", None)

with dask.config.set({"trioscheduler-test.answer": 42}):
    cluster = SSHCluster(hosts, connect_options=options, scheduler_options={"port": 0},
                         security=security)
with cluster, Client(cluster) as client:
    client.wait_for_workers(2, timeout=60)
    workers = sorted(client.scheduler_info()["workers"])
    x = client.submit(bytes, 1_000_000, workers=[workers[0]])
    y = client.submit(len, x, workers=[workers[1]])
    out = {"scheduler": cluster.scheduler_address, "workers": workers, "size": y.result(),
           "x_on": sorted(client.who_has(x)[x.key]),
           "config_scheduler": client.run_on_scheduler(answer),
           "config_workers": sorted(client.run(answer).values())}
    try:  # the same port without certificates: refused
        Client(cluster.scheduler_address.replace("tls://", "tcp://"), timeout=10).close()
        out["plain"] = "accepted"
    except Exception as exc:
        out["plain"] = type(exc).__name__
    print("RESULT " + json.dumps(out), flush=True)
    open(ready, "w").close()
    while not os.path.exists(go):  # the test looks at the hosts meanwhile
        time.sleep(0.05)
print("CLOSED", flush=True)
"""

ASYNC_CLIENT = """
import json, sys
import trio
from trioscheduler import Client, SSHCluster

async def main(hosts, key):
    options = {"known_hosts": None, "username": "root", "client_keys": [key]}
    async with SSHCluster(hosts, connect_options=options, worker_options={"n_workers": 2},
                          scheduler_options={"port": 0}, asynchronous=True) as cluster:
        async with Client(cluster, asynchronous=True) as client:
            total = await client.submit(sum, client.map(abs, range(-50, 0)))
            print("RESULT " + json.dumps({"total": total, "workers": cluster.workers}),
                  flush=True)
    print("CLOSED " + cluster.status, flush=True)

trio.run(main, sys.argv[1:4], sys.argv[4])
"""


def _pids(lab: Lab, host: str) -> set[int]:
    out = subprocess.run(
        ["ip", "netns", "pids", lab.ns(host)], capture_output=True, text=True, check=True
    ).stdout
    return {int(p) for p in out.split()}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "(gone)"


class SSHLab:
    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.sshd: dict[str, int] = {}
        self.key = tmp / "client_key"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True
        )
        (tmp / "authorized_keys").write_text((tmp / "client_key.pub").read_text())
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "host_key")],
            check=True,
        )
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        for host in HOSTS:
            config = tmp / f"sshd_{host}.conf"
            config.write_text(
                textwrap.dedent(
                    f"""\
                    ListenAddress {lab.addr(host)}
                    Port 22
                    HostKey {tmp / "host_key"}
                    AuthorizedKeysFile {tmp / "authorized_keys"}
                    PidFile none
                    PermitRootLogin prohibit-password
                    PasswordAuthentication no
                    KbdInteractiveAuthentication no
                    UsePAM no
                    StrictModes no
                    SetEnv PYTHONPATH={os.pathsep.join(test_netns.PYTHONPATH)}
                    """
                )
            )
            proc = lab.run(host, SSHD, "-D", "-e", "-f", str(config), log=tmp / f"sshd_{host}.log")
            self.sshd[host] = proc.pid
        for host in HOSTS:  # until each sshd listens
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                r = subprocess.run(
                    ["ip", "netns", "exec", lab.ns(host), "ss", "-ltn", "sport = :22"],
                    capture_output=True, text=True,
                )  # fmt: skip
                if lab.addr(host) in r.stdout:
                    break
                time.sleep(0.1)
            else:
                pytest.fail(
                    f"sshd on {host} did not start: {(tmp / f'sshd_{host}.log').read_text()}"
                )

    def client(self, mode: str, *more: str) -> tuple[subprocess.Popen[bytes], Path]:
        script = self.tmp / f"ssh_client_{mode}.py"
        script.write_text({"async": ASYNC_CLIENT, "tls": TLS_CLIENT}.get(mode, CLIENT))
        log = self.tmp / f"client_{mode}.log"
        addrs = [self.lab.addr(h) for h in HOSTS]
        proc = self.lab.run(
            "client", sys.executable, str(script), *addrs, str(self.key), mode, *more, log=log
        )
        return proc, log

    def leftovers(self, timeout: float = 30) -> dict[str, list[str]]:
        """What still runs on the hosts besides sshd, after waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            left = {
                h: [f"{p}: {_cmdline(p)}" for p in sorted(_pids(self.lab, h) - {self.sshd[h]})]
                for h in HOSTS
            }
            if not any(left.values()) or time.monotonic() > deadline:
                return {h: v for h, v in left.items() if v}
            time.sleep(0.1)


@pytest.fixture
def ssh_lab(lab: Lab, tmp_path: Path) -> SSHLab:
    if not os.path.exists(SSHD) or shutil.which("ssh-keygen") is None:
        pytest.skip("needs OpenSSH's sshd and ssh-keygen (apt-get install openssh-server)")
    pytest.importorskip("asyncssh")
    return SSHLab(lab, tmp_path)


def _result(log: Path) -> dict[str, object]:
    text = log.read_text()
    assert "RESULT " in text, text[-4000:]
    return dict(json.loads(text.split("RESULT ", 1)[1].splitlines()[0]))


def test_a_cluster_over_ssh_computes_and_leaves_nothing_running(ssh_lab: SSHLab) -> None:
    lab = ssh_lab.lab
    proc, log = ssh_lab.client("close")
    assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]
    out = _result(log)
    assert str(out["scheduler"]).startswith(f"tcp://{lab.addr('sched')}:")
    a, b = out["workers"]  # type: ignore[misc]
    assert a.startswith(f"tcp://{lab.addr('a')}:") and b.startswith(f"tcp://{lab.addr('b')}:")
    assert out["size"] == 1_000_000
    # made on a, copied to b across the bridge (y's size); b's copy may be gone already:
    # the AMM drops a replica nobody needs at its next tick (dask's default)
    assert a in out["x_on"] and set(out["x_on"]) <= {a, b}
    assert "CLOSED" in log.read_text()
    bad = log.read_text().split("BAD-OPTION ", 1)[1].splitlines()[0]
    assert "SSHClusterError" in bad and "bogus" in bad, bad  # the remote TypeError
    bad = log.read_text().split("BAD-PYTHON ", 1)[1].splitlines()[0]
    assert "SSHClusterError" in bad and "exit status 127" in bad, bad
    assert "/no/such/python: No such file or directory" in bad, bad
    assert ssh_lab.leftovers() == {}


def test_an_async_cluster_inside_trio_with_two_workers_per_host(ssh_lab: SSHLab) -> None:
    lab = ssh_lab.lab
    proc, log = ssh_lab.client("async")
    assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]
    out = _result(log)
    assert out["total"] == sum(range(1, 51))
    workers = out["workers"]
    assert sorted(workers) == [f"{lab.addr('a')}-1", f"{lab.addr('b')}-2"]  # type: ignore[call-overload]
    assert all(len(v) == 2 for v in workers.values())  # type: ignore[attr-defined]
    assert "CLOSED closed" in log.read_text()
    assert ssh_lab.leftovers() == {}


def test_the_ssh_command_runs_a_cluster_until_sigterm(ssh_lab: SSHLab, tmp_path: Path) -> None:
    lab = ssh_lab.lab
    log = tmp_path / "ssh_command.log"
    command = lab.run(
        "client", sys.executable, "-m", "trioscheduler", "ssh", lab.addr("a"), lab.addr("b"),
        "--scheduler", lab.addr("sched"), "--ssh-username", "root",
        "--ssh-private-key", str(ssh_lab.key), "--known-hosts", "none", "--nthreads", "2",
        log=log,
    )  # fmt: skip
    out = test_netns._client(
        lab,
        tmp_path,
        """
        def main(client):
            return {"workers": sorted(client.scheduler_info()["workers"]),
                    "total": client.submit(sum, client.map(abs, range(-10, 0))).result()}
        """,
    )
    assert out["total"] == 55
    assert [w.split(":")[1] for w in out["workers"]] == [  # type: ignore[attr-defined]
        f"//{lab.addr('a')}",
        f"//{lab.addr('b')}",
    ]
    command.send_signal(signal.SIGTERM)
    assert command.wait(timeout=60) == 0, log.read_text()[-4000:]
    assert ssh_lab.leftovers() == {}


def test_a_client_killed_with_sigkill_leaves_nothing_running(ssh_lab: SSHLab) -> None:
    proc, log = ssh_lab.client("hang")
    deadline = time.monotonic() + 120
    while "RESULT " not in log.read_text():
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.1)
    assert _result(ssh_lab.tmp / "client_hang.log")["size"] == 1_000_000
    # the cluster is up on the hosts: a scheduler, and a nanny and its worker on each
    running = {h: len(_pids(ssh_lab.lab, h) - {ssh_lab.sshd[h]}) for h in HOSTS}
    assert all(n >= 2 for n in running.values()), running
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert ssh_lab.leftovers() == {}


def _files_holding(text: str, root: Path, since: float) -> dict[str, int]:
    """Files under ``root`` changed since ``since`` whose contents hold ``text``: mode."""
    found = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            try:
                st = path.lstat()
                if st.st_mtime < since or not path.is_file() or st.st_size > 1 << 20:
                    continue
                if text in path.read_text(errors="replace"):
                    found[str(path)] = st.st_mode & 0o777
            except OSError:
                continue
    return found


def test_tls_between_the_processes_certificates_never_on_argv_config_forwarded(
    ssh_lab: SSHLab,
) -> None:
    """security=: every address is tls://, a plain connection is refused, the certificates
    reach the hosts inside SSH (on no command line, in no environment; a nanny's copies are
    0600 files, gone after close), and the client's dask config reaches the scheduler and
    the workers (dask's SSHCluster forwards it too)."""
    lab, tmp = ssh_lab.lab, ssh_lab.tmp
    since = time.time() - 1
    ready, go = tmp / "ready", tmp / "go"
    proc, log = ssh_lab.client("tls", str(ready), str(go))
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.1)
    out = _result(log)
    assert str(out["scheduler"]).startswith(f"tls://{lab.addr('sched')}:")
    a, b = out["workers"]  # type: ignore[misc]
    assert a.startswith(f"tls://{lab.addr('a')}:") and b.startswith(f"tls://{lab.addr('b')}:")
    assert out["size"] == 1_000_000  # a transfer over TLS (b's copy: see above)
    assert a in out["x_on"] and set(out["x_on"]) <= {a, b}
    assert out["plain"] != "accepted"
    assert out["config_scheduler"] == 42 and out["config_workers"] == [42, 42]
    ca = json.loads(log.read_text().split("CA ", 1)[1].splitlines()[0])
    body = ca.splitlines()[1]  # a line of the certificate's base64
    remote = {p for h in HOSTS for p in _pids(lab, h) - {ssh_lab.sshd[h]}}
    assert len(remote) >= 5  # a scheduler; a nanny and its worker on each worker host
    for pid in remote:
        for what in ("cmdline", "environ"):
            text = Path(f"/proc/{pid}/{what}").read_bytes().decode(errors="replace")
            assert "BEGIN" not in text and body not in text, (pid, what)
    copies = _files_holding(body, Path(tempfile.gettempdir()), since)
    copies = {p: mode for p, mode in copies.items() if not p.startswith(str(tmp))}
    assert copies and set(copies.values()) == {0o600}, copies  # the nannies' copies
    go.touch()
    assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]
    assert "CLOSED" in log.read_text()
    assert ssh_lab.leftovers() == {}
    assert not [p for p in copies if os.path.exists(p)]
