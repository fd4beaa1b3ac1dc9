"""IPython kernels in a real cluster of processes, driven through ``jupyter_client``.

The cluster: a scheduler process, one worker under a nanny ("solo"), and one process
holding two workers ("pair-0", "pair-1": they share that process's one kernel). Every
process runs with HOME pointed at an empty directory. Kernel clients run in the test's
own thread, never in a trio task (they run an asyncio loop of their own). Magics run in
real ``ipython -c`` subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

pytest.importorskip("ipykernel")
from jupyter_client.blocking.client import BlockingKernelClient  # noqa: E402

import trioscheduler  # noqa: E402
from trioscheduler.client import Client  # noqa: E402
from trioscheduler.kernels.magics import RemoteKernelError, run_cell_remote  # noqa: E402

pytestmark = pytest.mark.slow
TIMEOUT = 60.0  # generous: a hang fails the test, a slow machine does not
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Cluster:
    address: str
    home: Path
    local_dir: Path
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]]
    client: Client
    solo: str
    pair: list[str]

    def out(self, name: str) -> str:
        return (self.logs / f"{name}.out").read_text()

    def err(self, name: str) -> str:
        return (self.logs / f"{name}.err").read_text()


def _env(home: Path) -> dict[str, str]:
    # the workers import this module's functions, as a user's workers would, and the
    # same trioscheduler as this process
    paths = [str(Path(__file__).parent), str(Path(trioscheduler.__file__).parents[1])]
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": os.pathsep.join(paths)}
    for var in ("JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR", "IPYTHONDIR", "XDG_DATA_HOME"):
        env.pop(var, None)
    return env


def _spawn(logs: Path, name: str, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    with (logs / f"{name}.out").open("wb") as out, (logs / f"{name}.err").open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "trioscheduler", *args], stdout=out, stderr=err, env=env
        )


def _wait_for_file(path: Path) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            return dict(json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} was not written") from None
            time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("kernels")
    home, local_dir, logs = base / "home", base / "local", base / "logs"
    for d in (home, local_dir, logs):
        d.mkdir()
    env = _env(home)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        sched_file = base / "scheduler.json"
        procs["scheduler"] = _spawn(
            logs, "scheduler", env, "scheduler", "--port", "0", "--scheduler-file", str(sched_file)
        )
        address = _wait_for_file(sched_file)["address"]
        procs["solo"] = _spawn(
            logs,
            "solo",
            env,
            "worker",
            address,
            "--name",
            "solo",
            "--local-directory",
            str(local_dir),
        )
        procs["pair"] = _spawn(
            logs, "pair", env, "worker", address, "--name", "pair", "--no-nanny", "--nworkers", "2"
        )
        with Client(address, timeout=TIMEOUT) as client:
            client.wait_for_workers(3, timeout=TIMEOUT)
            names = {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}
            yield Cluster(
                address,
                home,
                local_dir,
                logs,
                procs,
                client,
                names["solo"],
                [names["pair-0"], names["pair-1"]],
            )
    finally:
        for proc in procs.values():
            _stop(proc)


class Kernel:
    """A ``BlockingKernelClient`` that collects what each cell sends."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.kc = BlockingKernelClient()
        self.kc.load_connection_info(info)
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=TIMEOUT)

    def run(self, code: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        outputs: list[dict[str, Any]] = []
        reply = self.kc.execute_interactive(
            code, timeout=TIMEOUT, output_hook=lambda msg: outputs.append(msg)
        )
        return reply["content"], outputs

    def value(self, expr: str) -> Any:
        content, outputs = self.run(f"import json as _json; print(_json.dumps({expr}))")
        assert content["status"] == "ok", content
        text = "".join(m["content"]["text"] for m in outputs if m["header"]["msg_type"] == "stream")
        return json.loads(text)

    def start(self, code: str) -> str:
        """Send a cell without waiting; return once the kernel reports it busy with it."""
        # stop_on_error=False: an interrupted cell must not abort the next one we send
        msg_id: str = self.kc.execute(code, stop_on_error=False)
        while True:
            msg = self.kc.get_iopub_msg(timeout=TIMEOUT)
            if (
                msg["parent_header"].get("msg_id") == msg_id
                and msg["header"]["msg_type"] == "execute_input"
            ):
                return msg_id

    def interrupt(self) -> None:
        self.kc.control_channel.send(self.kc.session.msg("interrupt_request", {}))

    def reply_to(self, msg_id: str) -> dict[str, Any]:
        while True:
            reply = self.kc.get_shell_msg(timeout=TIMEOUT)
            if reply["parent_header"].get("msg_id") == msg_id:
                return dict(reply["content"])

    def iopub_until_idle(self, msg_id: str) -> list[dict[str, Any]]:
        """Every IOPub message (of any cell, or none) until ``msg_id``'s cell is done."""
        msgs = []
        while True:
            msg = self.kc.get_iopub_msg(timeout=TIMEOUT)
            msgs.append(msg)
            if (
                msg["parent_header"].get("msg_id") == msg_id
                and msg["header"]["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"
            ):
                return msgs

    def close(self) -> None:
        self.kc.stop_channels()


@pytest.fixture
def kernel() -> Iterator[Callable[[dict[str, Any]], Kernel]]:
    opened: list[Kernel] = []

    def connect(info: dict[str, Any]) -> Kernel:
        k = Kernel(info)
        opened.append(k)
        return k

    yield connect
    for k in opened:
        k.close()


def inc(x: int) -> int:
    return x + 1


def test_kernels_see_live_state(cluster: Cluster, kernel: Callable[..., Kernel]) -> None:
    c = cluster.client
    futures = c.map(inc, range(10))
    assert c.gather(futures) == list(range(1, 11))
    [on_solo] = c.scatter([1234], workers=[cluster.solo])

    infos = c.start_ipython_workers()
    assert sorted(infos) == sorted([cluster.solo, *cluster.pair])
    json.dumps(infos)  # a connection file's worth of plain data
    # one kernel per process: the two workers of one process share it
    assert infos[cluster.pair[0]]["shell_port"] == infos[cluster.pair[1]]["shell_port"]
    assert infos[cluster.solo]["shell_port"] != infos[cluster.pair[0]]["shell_port"]
    again = c.start_ipython_workers(workers=[cluster.solo])
    assert again[cluster.solo]["shell_port"] == infos[cluster.solo]["shell_port"]

    solo = kernel(infos[cluster.solo])
    assert solo.value("worker.address") == cluster.solo
    # A7: no debugger offered (a breakpoint would freeze the worker)
    features = solo.kc.kernel_info(reply=True)["content"].get("supported_features", [])
    assert "debugger" not in features
    assert solo.value(f"worker.store[{on_solo.key!r}]") == 1234
    pair = kernel(infos[cluster.pair[0]])
    assert sorted(pair.value("sorted(workers)")) == sorted(cluster.pair)
    content, _ = pair.run("worker")  # two workers here: no single ``worker`` name
    assert content["ename"] == "NameError"

    sched = kernel(c.start_ipython_scheduler())
    in_memory = "sum(ts.state == 'memory' for ts in state.tasks.values())"
    assert sched.value(in_memory) == len(futures) + 1
    assert sched.value("scheduler.address") == cluster.address
    del futures
    deadline = time.monotonic() + TIMEOUT
    while sched.value(in_memory) != 1:  # released futures leave the scheduler's memory
        assert time.monotonic() < deadline
        time.sleep(0.05)

    # two clients on one kernel share its namespace
    other = kernel(infos[cluster.solo])
    solo.run("shared = 41")
    assert other.value("shared + 1") == 42

    # A8: nothing in HOME (an empty .ipython dir may appear); the connection file, with
    # its key, lives in the worker's local directory
    assert not (cluster.home / ".local").exists()
    assert not list(cluster.home.rglob("profile_default"))
    assert list(cluster.local_dir.rglob("trioscheduler-ipykernel-*/kernel-*.json"))


def test_await_cells_run_on_the_servers_trio_loop(
    cluster: Cluster, kernel: Callable[..., Kernel]
) -> None:
    c = cluster.client
    [x] = c.scatter([7], workers=[cluster.solo])
    solo = kernel(c.start_ipython_workers(workers=[cluster.solo])[cluster.solo])
    main = "threading.current_thread() is threading.main_thread()"
    solo.run("import threading")
    assert solo.value(main) is False  # a plain cell: the kernel's thread
    assert solo.value(f"[await trio.sleep(0), {main}][1]") is True
    # so a server coroutine can be awaited (here: what a peer's data request gets)
    solo.run("from trioscheduler.server.worker_peers import get_data")
    solo.run(f"reply = await get_data(worker, [{x.key!r}])")
    assert solo.value(f"reply['data'][{x.key!r}]") == 7
    # what an await cell prints reaches the cell, though it runs in the trio thread
    content, outputs = solo.run("await trio.sleep(0); print('awaited print')")
    assert content["status"] == "ok"
    assert [m["content"]["text"] for m in outputs if m["header"]["msg_type"] == "stream"] == [
        "awaited print\n"
    ]
    # %autoawait cannot move cells off the server's loop
    solo.run("%autoawait asyncio")
    assert solo.value(f"[await trio.sleep(0), {main}][1]") is True


def test_interrupt_ends_the_cell_not_the_server(
    cluster: Cluster, kernel: Callable[..., Kernel]
) -> None:
    c = cluster.client
    pid_before = c.run(os.getpid, workers=[cluster.solo])[cluster.solo]
    solo = kernel(c.start_ipython_workers(workers=[cluster.solo])[cluster.solo])
    for cell, error in [
        ("while True: pass", "KeyboardInterrupt"),
        # (a single blocking C call, time.sleep(1000), ends only when it returns)
        ("import time\nwhile True: time.sleep(0.05)", "KeyboardInterrupt"),
        ("await trio.sleep(1000)", "Cancelled"),  # its task on the worker's loop is cancelled
    ]:
        msg_id = solo.start(cell)
        if cell == "while True: pass":  # meanwhile the worker serves tasks as before
            assert c.submit(inc, 5, workers=[cluster.solo], pure=False).result(TIMEOUT) == 6
        solo.interrupt()
        reply = solo.reply_to(msg_id)
        assert reply["status"] == "error" and reply["ename"] == error, (cell, reply)
        assert solo.value("1 + 1") == 2  # the kernel goes on
    assert c.run(os.getpid, workers=[cluster.solo])[cluster.solo] == pid_before
    assert c.submit(inc, 1, workers=[cluster.solo], pure=False).result(TIMEOUT) == 2
    assert cluster.procs["solo"].poll() is None


def test_shutdown_request_stops_only_the_kernel(
    cluster: Cluster, kernel: Callable[..., Kernel]
) -> None:
    c = cluster.client
    info = c.start_ipython_workers(workers=[cluster.solo])[cluster.solo]
    solo = kernel(info)
    # a child process of the worker, as a task's subprocess would be
    child_pid = solo.value("(child := __import__('subprocess').Popen(['sleep', '120'])).pid")
    try:
        solo.run("marker = 'old kernel'")
        files = list(cluster.local_dir.rglob("trioscheduler-ipykernel-*/kernel-*.json"))
        assert files
        solo.kc.shutdown()
        deadline = time.monotonic() + TIMEOUT
        while any(f.exists() for f in files):  # the kernel tore itself down
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert psutil.pid_exists(child_pid)
        assert psutil.Process(child_pid).status() != psutil.STATUS_ZOMBIE
        assert c.submit(inc, 2, workers=[cluster.solo], pure=False).result(TIMEOUT) == 3
        assert cluster.procs["solo"].poll() is None
        # the old connection info now fails with a clear error, not a hang
        with pytest.raises(RemoteKernelError, match="did not answer"):
            run_cell_remote(info, "1", timeout=1)
        # a fresh kernel on request, with a new key and a fresh namespace
        new = c.start_ipython_workers(workers=[cluster.solo])[cluster.solo]
        assert new["key"] != info["key"]
        fresh = kernel(new)
        assert fresh.value("worker.address") == cluster.solo
        assert fresh.run("marker")[0]["ename"] == "NameError"
    finally:
        os.kill(child_pid, signal.SIGKILL)


def say(text: str) -> str:
    print(text, flush=True)
    os.write(1, f"fd {text}\n".encode())
    return text


def test_only_cell_output_reaches_the_kernel_client(
    cluster: Cluster, kernel: Callable[..., Kernel]
) -> None:
    c = cluster.client
    solo = kernel(c.start_ipython_workers(workers=[cluster.solo])[cluster.solo])
    # while a cell runs in the kernel, a task prints on the worker
    msg_id = solo.start("import time; time.sleep(0.5); print('from the cell')")
    assert c.submit(say, "task-marker", workers=[cluster.solo], pure=False).result(TIMEOUT)
    msgs = solo.iopub_until_idle(msg_id)
    log_id = solo.start("import logging; logging.getLogger('trioscheduler').warning('log-marker')")
    msgs += solo.iopub_until_idle(log_id)
    seen = json.dumps([m["content"] for m in msgs])
    assert "from the cell" in seen
    assert "task-marker" not in seen
    deadline = time.monotonic() + TIMEOUT
    while "fd task-marker" not in cluster.out("solo"):  # the nanny's worker writes there
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "task-marker\n" in cluster.out("solo")  # print() went to the worker's stdout
    assert "from the cell" not in cluster.out("solo")
    assert "log-marker" in cluster.err("solo")  # the process's log handlers are untouched
    # A12: get_ipython() is the kernel's shell in the worker now, but our own code
    # (a worker_client's Client, say) does not take it for the user's IPython
    assert solo.value(
        "get_ipython() is not None and "
        "__import__('trioscheduler.kernels.magics').kernels.magics.user_shell() is None"
    )
    # A6/A15: the process keeps its excepthook and its __main__
    assert solo.value("__import__('sys').excepthook is __import__('sys').__excepthook__")
    assert (
        solo.value("__import__('sys').modules['__main__'].__spec__.name")
        == "trioscheduler.__main__"
    )


def test_servers_close_cleanly_with_a_busy_cell(
    tmp_path: Path, kernel: Callable[..., Kernel]
) -> None:
    env = _env(tmp_path)
    sched_file = tmp_path / "s.json"
    sched = _spawn(
        tmp_path, "s", env, "scheduler", "--port", "0", "--scheduler-file", str(sched_file)
    )
    worker = None
    try:
        address = _wait_for_file(sched_file)["address"]
        worker = _spawn(tmp_path, "w", env, "worker", address, "--no-nanny")
        with Client(address, timeout=TIMEOUT) as c:
            c.wait_for_workers(1, timeout=TIMEOUT)
            [winfo] = c.start_ipython_workers().values()
            sinfo = c.start_ipython_scheduler()
            kernel(winfo).start("while True: pass")
            kernel(sinfo).start("import time; time.sleep(1000)")  # blocked in C
        assert _stop(worker) == 0
        assert _stop(sched, signal.SIGINT) == 0
        for name in ("s", "w"):
            err = (tmp_path / f"{name}.err").read_text()
            for bad in ("Traceback", "Task was destroyed", "never awaited", "Exception ignored"):
                assert bad not in err, (name, err)
    finally:
        for proc in (worker, sched):
            if proc is not None:
                _stop(proc, signal.SIGKILL)


def _ipython(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "IPython", "--no-banner", "--colors=nocolor", "-c", code],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
        env=env,
    )


def test_magics_in_a_real_ipython(cluster: Cluster) -> None:
    a, b = cluster.pair
    script = f"""
from trioscheduler import Client
c = Client({cluster.address!r})
c.start_ipython_scheduler()
info = c.start_ipython_workers(magic_names="w_*")
%scheduler len(state.workers)
%remote info[{a!r}] print("A", worker.address)
%remote info[{b!r}] print("B", worker.address)
get_ipython().run_cell_magic("remote", "info[{cluster.solo!r}]", "x = 20\\nprint('C', x + 1, worker.name)")
%w_0 print("W0", worker.address)
%remote info[{a!r}] 1/0
print("reached", 6 * 7)
"""
    proc = _ipython(script, _env(cluster.home))
    out, err = ANSI.sub("", proc.stdout), ANSI.sub("", proc.stderr)
    assert proc.returncode != 0  # the remote error failed the command
    assert re.search(r"^3$", out, re.M), out
    assert f"A {a}" in out and f"B {b}" in out  # one kernel, ``worker`` bound per target
    assert "C 21 solo" in out
    w0 = sorted([cluster.solo, a, b])[0]
    assert f"W0 {w0}" in out
    assert "ZeroDivisionError" in out + err
    assert "reached 42" not in out


def test_in_process_cluster_inside_ipython_is_refused() -> None:
    script = """
from trioscheduler import Client
c = Client(n_workers=1, processes=False)
try:
    c.start_ipython_workers()
except RuntimeError as e:
    print("REFUSED", e)
c.close()
"""
    proc = _ipython(script)
    assert proc.returncode == 0, proc.stderr
    assert "REFUSED" in proc.stdout and "client.cluster.workers" in proc.stdout


def test_without_the_extra_the_error_names_it(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "jupyter_client", None)
    with pytest.raises(ImportError, match=r"trioscheduler\[ipython\]"):
        cluster.client.start_ipython_workers()
    with pytest.raises(ImportError, match=r"trioscheduler\[ipython\]"):
        cluster.client.start_ipython_scheduler()


def test_in_process_cluster_shares_one_kernel() -> None:
    """Scheduler and workers in one process (``processes=False``) share its one kernel;
    ``run_cell_remote`` (what ``%remote`` calls) binds ``worker`` to the target."""
    script = """
from trioscheduler import Client
from trioscheduler.kernels.magics import run_cell_remote
with Client(n_workers=2, processes=False) as c:
    infos = c.start_ipython_workers()
    sinfo = c.start_ipython_scheduler()
    print("PORTS", len({i["shell_port"] for i in [sinfo, *infos.values()]}))
    for addr, info in sorted(infos.items()):
        run_cell_remote(info, f"print('BOUND', worker.address == {addr!r})")
    run_cell_remote(sinfo, "print('WORKERS', len(state.workers), sorted(workers) == sorted(state.workers))")
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT * 2
    )
    assert proc.returncode == 0, proc.stderr
    assert "PORTS 1" in proc.stdout
    assert proc.stdout.count("BOUND True") == 2
    assert "WORKERS 2 True" in proc.stdout


async def test_asynchronous_client_starts_kernels(cluster: Cluster) -> None:
    async with Client(cluster.address, asynchronous=True, timeout=TIMEOUT) as ac:
        infos = await ac.start_ipython_workers(workers=[cluster.solo])
        sinfo = await ac.start_ipython_scheduler()
        assert list(infos) == [cluster.solo] and infos[cluster.solo]["role"] == "worker"
        assert sinfo["server_address"] == cluster.address and sinfo["role"] == "scheduler"
        # asked again: the same kernel (one per process)
        assert (await ac.start_ipython_scheduler())["key"] == sinfo["key"]
        with pytest.raises(ValueError, match="no running worker"):
            await ac.start_ipython_workers(workers=["nobody"])


@pytest.mark.skipif(
    __import__("shutil").which("jupyter-qtconsole") is not None, reason="qtconsole installed"
)
def test_qtconsole_without_qtconsole_says_how_to_connect(cluster: Cluster) -> None:
    with pytest.raises(RuntimeError, match="jupyter console --existing"):
        cluster.client.start_ipython_scheduler(magic_name=None, qtconsole=True)
