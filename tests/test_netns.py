"""Across hosts, simulated: the scheduler, two workers and the client each in a Linux
network namespace of their own, joined by veth pairs to a bridge, so traffic crosses
real interfaces with real addresses (10.77.x.y), not 127.0.0.1 (issue 18).

Needs root and ``ip`` (iproute2); skipped, with the reason, where namespaces cannot be
made. Cutting a host's link is ``ip link set down`` on its bridge port.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

HOSTS = {"sched": 1, "a": 2, "b": 3, "client": 4}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@dataclass
class Lab:
    """Four namespaces on one bridge; processes started in them are killed at the end."""

    tag: str
    subnet: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def addr(self, host: str) -> str:
        return f"{self.subnet}.{HOSTS[host]}"

    def port(self, host: str) -> str:
        return f"p{HOSTS[host]}{self.tag[-4:]}"  # the bridge's end of the host's veth

    def run(self, host: str, *cmd: str, log: Path) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(host), *cmd], stdout=out, stderr=out, env=env
            )
        self.procs.append(proc)
        return proc

    def link(self, host: str, state: str) -> None:
        _ip("-n", self.ns("switch"), "link", "set", self.port(host), state)


@pytest.fixture
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's ip")
    tag = f"ts{os.getpid() % 100000:05d}"
    lab = Lab(tag, f"10.77.{os.getpid() % 250}")
    made: list[str] = []
    try:
        try:
            _ip("netns", "add", lab.ns("switch"))
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"ip netns add is not permitted here: {exc.stderr.strip()}")
        made.append(lab.ns("switch"))
        _ip("-n", lab.ns("switch"), "link", "add", "br0", "type", "bridge")
        _ip("-n", lab.ns("switch"), "link", "set", "br0", "up")
        for host in HOSTS:
            ns = lab.ns(host)
            _ip("netns", "add", ns)
            made.append(ns)
            veth, port = f"v{HOSTS[host]}{tag[-4:]}", lab.port(host)
            _ip("link", "add", veth, "type", "veth", "peer", "name", port)
            _ip("link", "set", veth, "netns", ns)
            _ip("link", "set", port, "netns", lab.ns("switch"))
            _ip("-n", lab.ns("switch"), "link", "set", port, "master", "br0")
            _ip("-n", lab.ns("switch"), "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{lab.addr(host)}/24", "dev", veth)
            _ip("-n", ns, "link", "set", veth, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield lab
    finally:
        for proc in lab.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def _start_cluster(lab: Lab, tmp_path: Path, worker_timeout: float = 30.0) -> str:
    address = f"tcp://{lab.addr('sched')}:8786"
    lab.run(
        "sched", sys.executable, "-m", "trioscheduler", "scheduler", "--host",
        lab.addr("sched"), "--port", "8786", "--worker-timeout", str(worker_timeout),
        log=tmp_path / "scheduler.log",
    )  # fmt: skip
    for host in ("a", "b"):
        lab.run(
            host, sys.executable, "-m", "trioscheduler", "worker", address, "--nthreads", "2",
            "--name", host, "--death-timeout", "30", log=tmp_path / f"worker-{host}.log",
        )  # fmt: skip
    return address


def _client(lab: Lab, tmp_path: Path, code: str, timeout: float = 120) -> dict[str, object]:
    """Run ``code`` (it defines ``main(client) -> dict``) in the client's namespace."""
    script = tmp_path / "client_script.py"
    script.write_text(
        textwrap.dedent(code)
        + textwrap.dedent(
            """
            if __name__ == "__main__":
                import json, sys
                from trioscheduler import Client
                with Client(sys.argv[1], timeout=30) as client:
                    client.wait_for_workers(2, timeout=60)
                    print("RESULT " + json.dumps(main(client)), flush=True)
            """
        )
    )
    log = tmp_path / "client.log"
    proc = lab.run("client", sys.executable, str(script), f"tcp://{lab.addr('sched')}:8786", log=log)
    proc.wait(timeout=timeout)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    return dict(json.loads(text.split("RESULT ", 1)[1]))


def test_a_computation_crosses_real_interfaces_worker_to_worker(lab: Lab, tmp_path: Path) -> None:
    _start_cluster(lab, tmp_path)
    out = _client(
        lab,
        tmp_path,
        """
        def make(n):
            return bytes(n)

        def size(data):
            return len(data)

        def main(client):
            workers = sorted(client.scheduler_info()["workers"])
            x = client.submit(make, 5_000_000, workers=[workers[0]])
            y = client.submit(size, x, workers=[workers[1]])
            return {"workers": workers, "size": y.result(), "x_on": sorted(client.who_has(x)[x.key])}
        """,
    )
    a, b = out["workers"]  # type: ignore[misc]
    assert a.startswith(f"tcp://{lab.addr('a')}:") and b.startswith(f"tcp://{lab.addr('b')}:")
    assert out["size"] == 5_000_000
    assert out["x_on"] == [a, b]  # made on a, copied to b over the bridge


def test_a_worker_host_cut_off_mid_graph_is_noticed_and_the_result_is_right(
    lab: Lab, tmp_path: Path
) -> None:
    _start_cluster(lab, tmp_path, worker_timeout=3.0)
    flag = tmp_path / "cut"
    code = f"""
        import os, time

        def slow(i):
            time.sleep(0.05)
            return i

        def total(*xs):
            return sum(xs)

        def main(client):
            futures = client.map(slow, range(400), pure=False)
            while sum(f.done() for f in futures) < 40:
                time.sleep(0.05)
            open({str(flag)!r}, "w").close()  # the test cuts worker b's link now
            t0 = time.monotonic()
            while len(client.scheduler_info()["workers"]) > 1:
                time.sleep(0.1)
            noticed = time.monotonic() - t0
            result = client.submit(total, *futures).result()
            return {{"result": result, "noticed_after": noticed,
                     "workers_left": sorted(client.scheduler_info()["workers"])}}
        """
    script_timeout = 120
    deadline = time.monotonic() + script_timeout

    def cut_when_asked() -> None:
        while not flag.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        lab.link("b", "down")

    cutter = threading.Thread(target=cut_when_asked, daemon=True)
    cutter.start()
    out = _client(lab, tmp_path, code, timeout=script_timeout)
    cutter.join(timeout=5)
    assert out["result"] == sum(range(400))  # b's tasks and results were redone on a
    (left,) = out["workers_left"]  # type: ignore[misc]
    assert left.startswith(f"tcp://{lab.addr('a')}:")
    print(f"worker b's loss noticed {out['noticed_after']:.1f} s after its link was cut")
