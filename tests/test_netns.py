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

import trioscheduler

pytestmark = pytest.mark.slow

HOSTS = {"sched": 1, "a": 2, "b": 3, "client": 4}
# the tests' helpers, and the trioscheduler under test (not another one installed)
PYTHONPATH = (str(Path(__file__).parent), str(Path(trioscheduler.__file__).parents[1]))


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
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(PYTHONPATH)}
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


def _client(
    lab: Lab, tmp_path: Path, code: str, timeout: float = 120, workers: int = 2
) -> dict[str, object]:
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
                    client.wait_for_workers({workers}, timeout=60)
                    print("RESULT " + json.dumps(main(client)), flush=True)
            """
        ).replace("{workers}", str(workers))
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
    # made on a, copied to b over the bridge (y's size); b's copy may be gone already: the
    # AMM drops a replica nobody needs at its next tick (dask's default)
    assert a in out["x_on"] and set(out["x_on"]) <= {a, b}


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


def _scheduler(
    lab: Lab, tmp_path: Path, log: str, worker_timeout: float = 30.0
) -> subprocess.Popen[bytes]:
    return lab.run(
        "sched", sys.executable, "-m", "trioscheduler", "scheduler", "--host",
        lab.addr("sched"), "--port", "8786", "--worker-timeout", str(worker_timeout),
        log=tmp_path / log,
    )  # fmt: skip


def _wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never came"
        time.sleep(0.05)


def test_a_worker_cut_off_past_the_worker_timeout_rejoins_when_its_link_is_back(
    lab: Lab, tmp_path: Path
) -> None:
    _start_cluster(lab, tmp_path, worker_timeout=3.0)
    cut, restore = tmp_path / "cut", tmp_path / "restore"
    code = f"""
        import time

        def where(x):
            from trioscheduler import get_worker
            return [get_worker().address, x]

        def main(client):
            b = next(w for w, i in client.scheduler_info()["workers"].items() if i["name"] == "b")
            before = client.submit(where, 1, workers=[b], pure=False).result()
            open({str(cut)!r}, "w").close()  # the test cuts b's link now
            while b in client.scheduler_info()["workers"]:
                time.sleep(0.1)  # the scheduler gave b up (no heartbeat for 3 s)
            open({str(restore)!r}, "w").close()  # ... and restores it
            while b not in client.scheduler_info()["workers"]:
                time.sleep(0.1)
            after = client.submit(where, 2, workers=[b], pure=False).result()
            return {{"b": b, "before": before, "after": after}}
        """

    def cut_and_restore() -> None:
        _wait_for(cut)
        lab.link("b", "down")
        _wait_for(restore)
        lab.link("b", "up")

    switch = threading.Thread(target=cut_and_restore, daemon=True)
    switch.start()
    out = _client(lab, tmp_path, code)
    switch.join(timeout=5)
    b = out["b"]
    assert out["before"] == [b, 1] and out["after"] == [b, 2]  # the same worker, back
    assert "rejoined" in (tmp_path / "worker-b.log").read_text()


def test_workers_under_nannies_rejoin_a_scheduler_killed_and_restarted(
    lab: Lab, tmp_path: Path
) -> None:
    _start_cluster(lab, tmp_path)  # --death-timeout 30
    scheduler = lab.procs[0]
    code = """
        def square(x):
            return x * x

        def main(client):
            workers = sorted(client.scheduler_info()["workers"])
            assert client.submit(square, 3, workers=[workers[0]]).result() == 9
            return {"workers": workers}
        """
    workers = _client(lab, tmp_path, code)["workers"]
    scheduler.kill()  # SIGKILL: ``ip netns exec`` exec'd the scheduler itself
    scheduler.wait(timeout=30)
    time.sleep(2)  # the scheduler stays away a while: the workers dial in vain
    _scheduler(lab, tmp_path, "scheduler-2.log")
    out = _client(
        lab,
        tmp_path,
        """
        def main(client):
            workers = sorted(client.scheduler_info()["workers"])
            return {"workers": workers, "sums": client.gather(
                [client.submit(sum, range(n), workers=[w]) for n, w in enumerate(workers, 10)]
            )}
        """,
    )
    assert out["workers"] == workers  # the same two, at their addresses
    assert out["sums"] == [sum(range(10)), sum(range(11))]
    for host in ("a", "b"):
        text = (tmp_path / f"worker-{host}.log").read_text()
        assert "rejoined" in text and "restarting it" not in text  # the same process


def test_a_worker_gives_up_a_scheduler_that_never_comes_back(lab: Lab, tmp_path: Path) -> None:
    address = f"tcp://{lab.addr('sched')}:8786"
    _scheduler(lab, tmp_path, "scheduler.log")
    worker = lab.run(
        "a", sys.executable, "-m", "trioscheduler", "worker", address, "--name", "a",
        "--death-timeout", "4", log=tmp_path / "worker-a.log",
    )  # fmt: skip
    out = _client(lab, tmp_path, "def main(client):\n    return {'n': 1 + 1}\n", workers=1)
    assert out == {"n": 2}  # the worker had joined
    scheduler = lab.procs[0]
    scheduler.kill()
    scheduler.wait(timeout=30)
    assert worker.wait(timeout=60) == 0  # the nanny stops with its worker, in order
    text = (tmp_path / "worker-a.log").read_text()
    assert "no scheduler at" in text and "rejoined" not in text
