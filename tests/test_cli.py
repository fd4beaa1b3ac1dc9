"""The ``trioscheduler`` command in real, separate processes."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

import trioscheduler
from trioscheduler.cli.main import build_parser
from trioscheduler.client.client import Client
from trioscheduler.server.collector import ENV, THRESHOLDS, tune_collector
from trioscheduler.server.nanny import fork_supported
from trioscheduler.server.task_context import get_worker
from trioscheduler.server.worker_process import parse_resources

TIMEOUT = 60

needs_fork = pytest.mark.skipif(not fork_supported(), reason="fork needs Linux pidfd")


class Proc:
    """A running command whose output is collected into files (no pipe to fill up)."""

    def __init__(self, process: trio.Process, out: Path, err: Path) -> None:
        self.process = process
        self.out = out
        self.err = err

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()


@asynccontextmanager
async def spawn(tmp_path: Path, name: str, *args: str) -> AsyncIterator[Proc]:
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with out.open("wb") as fo, err.open("wb") as fe:  # noqa: ASYNC230 - creating empty files
        # the workers import this test module's functions, as a user's workers would,
        # and the trioscheduler this test imports (not another installed one)
        path = [str(Path(__file__).parent), str(Path(trioscheduler.__file__).parents[1])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "trioscheduler", *args], stdout=fo, stderr=fe, env=env
        )
    try:
        yield Proc(process, out, err)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()


async def wait_for_file(path: Path) -> dict[str, Any]:
    apath = trio.Path(path)
    while not await apath.exists():  # noqa: ASYNC110 - another process writes it
        await trio.sleep(0.05)
    return dict(json.loads(await apath.read_text()))


async def stop(proc: Proc, sig: int = signal.SIGTERM) -> int:
    proc.process.send_signal(sig)
    return await proc.process.wait()


def node_name(_: Any = None) -> str | None:
    return get_worker().name


def test_parse_resources_and_arguments() -> None:
    assert parse_resources("GPU=2 FPGA=1.5") == {"GPU": 2.0, "FPGA": 1.5}
    assert parse_resources("GPU=2,MEM=1e9") == {"GPU": 2.0, "MEM": 1e9}
    assert parse_resources("") == {}
    with pytest.raises(Exception, match="NAME=AMOUNT"):
        parse_resources("GPU")
    with pytest.raises(Exception, match="not a number"):
        parse_resources("GPU=lots")
    args = build_parser().parse_args(
        ["worker", "tcp://h:1", "--no-nanny", "--resources", "GPU=2", "--nthreads", "3"]
    )
    assert not args.nanny and args.resources == {"GPU": 2.0} and args.nthreads == 3
    assert build_parser().parse_args(["worker", "tcp://h:1"]).nanny
    assert build_parser().parse_args(["worker", "--start-method", "fork"]).start_method == "fork"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--start-method", "forkserver"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])


async def test_scheduler_and_two_workers_serve_a_client(tmp_path: Path) -> None:
    sched_file = tmp_path / "scheduler.json"
    with trio.fail_after(TIMEOUT):
        async with spawn(
            tmp_path, "scheduler", "scheduler", "--port", "0", "--scheduler-file", str(sched_file)
        ) as sched:
            address = (await wait_for_file(sched_file))["address"]
            assert address.startswith("tcp://127.0.0.1:")
            async with (
                spawn(tmp_path, "w1", "worker", address, "--nthreads", "2", "--name", "plain", "--no-nanny", "--memory-limit", "1GiB", "--nworkers", "2") as w1,
                spawn(tmp_path, "w2", "worker", "--scheduler-file", str(sched_file), "--name", "gpu", "--resources", "GPU=2", "--nthreads", "1") as w2,
            ):  # fmt: skip
                async with Client(address, asynchronous=True, timeout=20) as c:
                    await c.wait_for_workers(3)  # two in w1's process, one under w2's nanny
                    info = await c.scheduler_info()
                    names = {w["name"] for w in info["workers"].values()}
                    assert names == {"plain-0", "plain-1", "gpu"}
                    xs = c.map(lambda x: x * 10, range(30))
                    assert await c.submit(sum, xs) == 4350
                    gpu = c.submit(node_name, resources={"GPU": 1}, pure=False)
                    assert await gpu == "gpu"
                # SIGTERM: orderly exit, code 0, one log line, no traceback
                assert await stop(w1) == 0
                assert await stop(w2) == 0
            assert await stop(sched, signal.SIGINT) == 0
            for p in (sched, w1, w2):
                assert "Traceback" not in p.stderr(), p.stderr()
            assert "SIGTERM received" in w1.stderr()
            assert "SIGINT received" in sched.stderr()
            assert "closing" in w1.stderr()
            assert not sched_file.exists()  # removed on exit


@pytest.mark.parametrize(
    "method",
    [pytest.param("fork", marks=needs_fork), "spawn"],
)
async def test_worker_under_nanny_restarts_and_exits_with_scheduler(
    tmp_path: Path, method: str
) -> None:
    sched_file = tmp_path / "scheduler.json"
    with trio.fail_after(TIMEOUT):
        async with spawn(
            tmp_path, "scheduler", "scheduler", "--port", "0", "--scheduler-file", str(sched_file)
        ) as sched:
            address = (await wait_for_file(sched_file))["address"]
            async with spawn(
                tmp_path, "w", "worker", address, "--nthreads", "1", "--memory-limit", "0",
                "--start-method", method, "--death-timeout", "2",
            ) as w:  # fmt: skip
                async with Client(address, asynchronous=True, timeout=20) as c:
                    await c.wait_for_workers(1)
                    # the scheduler's and the worker's collectors are tuned; ours is not
                    assert await c.run_on_scheduler(gc.get_threshold) == THRESHOLDS
                    assert await c.submit(gc.get_threshold, pure=False) == THRESHOLDS
                    assert gc.get_threshold() != THRESHOLDS
                    pid = await c.submit(os.getpid, pure=False)
                    forked = psutil.Process(pid).name() == "trioscheduler"
                    assert forked == (method == "fork")
                    os.kill(pid, signal.SIGKILL)
                    while True:  # the nanny starts a new worker process
                        try:
                            with trio.fail_after(2):
                                new_pid = await c.submit(os.getpid, pure=False)
                        except trio.TooSlowError:
                            continue
                        if new_pid != pid:
                            break
                # the scheduler goes away: after --death-timeout the worker closes and
                # the nanny process ends
                assert await stop(sched) == 0
                assert await w.process.wait() == 0
            assert "SIGKILL" in w.stderr() and "restarting" in w.stderr()
            assert "Traceback" not in w.stderr(), w.stderr()


async def test_demo_runs(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with spawn(
            tmp_path, "demo", "demo", "--workers", "2", "--threads", "1", "--tasks", "200"
        ) as demo:
            assert await demo.process.wait() == 0, demo.stderr()
        out = demo.stdout()
        assert "pi ~ 3.1" in out
        assert "52,527 takes 339 steps" in out
        assert "cluster closed" in out
        assert "Traceback" not in demo.stderr()


def test_collector_thresholds_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    before = gc.get_threshold()
    try:
        monkeypatch.setenv(ENV, "700,10,10")
        assert tune_collector() == (700, 10, 10) == gc.get_threshold()
        monkeypatch.setenv(ENV, "lots")
        with caplog.at_level(logging.WARNING, logger="trioscheduler.server"):
            assert tune_collector() == THRESHOLDS == gc.get_threshold()
        assert "is not one to three non-negative integers" in caplog.text
    finally:
        gc.set_threshold(*before)


def test_contact_address() -> None:
    from trioscheduler.cli.main import contact_address

    assert contact_address("tcp://127.0.0.1:8786") == "tcp://127.0.0.1:8786"
    assert contact_address("inproc://s") == "inproc://s"
    wildcard = contact_address("tcp://0.0.0.0:8786")
    assert (
        wildcard.startswith("tcp://") and wildcard.endswith(":8786") and "0.0.0.0" not in wildcard
    )
