"""The nanny with real worker processes: restarts, the memory terminate threshold, reaping."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest
import trio

from trioscheduler import wire
from trioscheduler.client import Client
from trioscheduler.nanny import Nanny, WorkerStartError
from trioscheduler.scheduler import Scheduler

TIMEOUT = 60


def hog(nbytes: int) -> int:
    data = b"x" * nbytes  # written, so resident
    time.sleep(30)
    return len(data)


async def test_restart_on_kill_and_on_request(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trioscheduler")
    with trio.fail_after(TIMEOUT):
        async with Scheduler("tcp://127.0.0.1:0") as s:
            async with Nanny(s.address, nthreads=1, memory_limit="1GiB", name="n1") as nanny:
                assert nanny.memory_limit == 2**30
                first_pid, first_addr = nanny.pid, nanny.worker_address
                assert first_pid is not None and first_addr is not None
                assert psutil.Process(first_pid).parent().pid == os.getpid()  # type: ignore[union-attr]
                second_addr = await nanny.restart("testing restart")
                assert second_addr != first_addr and nanny.pid != first_pid
                assert (
                    not psutil.pid_exists(first_pid)
                    or psutil.Process(first_pid).status() == psutil.STATUS_ZOMBIE
                )
                assert nanny.restarts == 1
                async with Client(s.address, asynchronous=True) as c:
                    await c.wait_for_workers(1)
                    assert await c.submit(os.getpid, pure=False) == nanny.pid
                # the scheduler knows the nanny; the nanny takes requests on its address
                assert nanny.address is not None
                assert s.state.workers[second_addr].nanny == nanny.address
                async with wire.ConnectionPool() as pool, pool.connect(nanny.address) as stream:
                    await stream.send({"op": "status"})
                    status = await stream.receive()
                    assert status == {
                        "status": "OK",
                        "worker": second_addr,
                        "pid": nanny.pid,
                        "restarts": 1,
                    }
                    await stream.send({"op": "restart", "reason": "asked over the wire"})
                    reply = await stream.receive()
                    assert reply["status"] == "OK" and reply["worker"] == nanny.worker_address
                    assert reply["worker"] != second_addr and nanny.restarts == 2
                    await stream.send({"op": "dance"})
                    assert (await stream.receive())["status"] == "error"
                last_pid = nanny.pid
            assert nanny.status == "closed"
            assert not psutil.pid_exists(last_pid)  # type: ignore[arg-type]
    assert "testing restart" in caplog.text and "asked over the wire" in caplog.text


async def test_memory_terminate_threshold_kills_and_restarts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="trioscheduler")
    limit = 400 * 2**20
    with trio.fail_after(TIMEOUT):
        async with Scheduler("tcp://127.0.0.1:0") as s:
            async with Nanny(s.address, nthreads=1, memory_limit=limit) as nanny:
                pid = nanny.pid
                async with Client(s.address, asynchronous=True) as c:
                    await c.wait_for_workers(1)
                    future = c.submit(hog, limit, pure=False)
                    while nanny.restarts == 0 or nanny.pid == pid:  # noqa: ASYNC110 - a child's fate
                        await trio.sleep(0.05)
                    await future.cancel()
    assert "of its memory limit" in caplog.text and "killed" in caplog.text
    assert "lost" in caplog.text  # the scheduler noticed the loss


async def test_nanny_start_failure_is_an_error() -> None:
    with trio.fail_after(TIMEOUT):
        async with Scheduler("tcp://127.0.0.1:0") as s:
            # a broken environment: the child's Python cannot even start
            broken = {**os.environ, "PYTHONHOME": "/nonexistent"}
            with pytest.raises(WorkerStartError, match="exited before joining"):
                async with Nanny(s.address, memory_limit=0, env=broken) as n:
                    raise AssertionError(f"should not start: {n}")
    with pytest.raises(wire.AddressError, match="bogus"):
        async with Nanny("bogus://scheduler", memory_limit=0) as n:
            raise AssertionError(f"should not start: {n}")


async def test_worker_exits_when_its_nanny_is_killed(tmp_path: Path) -> None:
    """SIGKILL to the nanny process: its worker notices (stdin EOF) and exits too."""
    with trio.fail_after(TIMEOUT):
        async with Scheduler("tcp://127.0.0.1:0") as s:
            with (tmp_path / "nanny.err").open("wb") as err:  # noqa: ASYNC230 - an empty file
                nanny_proc = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "trioscheduler", "worker", s.address, "--nthreads", "1", "--memory-limit", "0"],
                    stderr=err,
                )  # fmt: skip
            try:
                async with Client(s.address, asynchronous=True) as c:
                    await c.wait_for_workers(1)
                    worker_pid = await c.submit(os.getpid, pure=False)
                assert psutil.Process(worker_pid).ppid() == nanny_proc.pid
                nanny_proc.send_signal(signal.SIGKILL)
                await nanny_proc.wait()
                worker = psutil.Process(worker_pid)
                await trio.to_thread.run_sync(worker.wait)
                while s.state.workers:  # noqa: ASYNC110 - the scheduler's view of it
                    await trio.sleep(0.02)
            finally:
                with trio.CancelScope(shield=True):
                    if nanny_proc.returncode is None:
                        nanny_proc.kill()
                    await nanny_proc.wait()
    assert "the nanny is gone" in (tmp_path / "nanny.err").read_text()


async def test_spill_directories_of_killed_workers_are_removed(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with Scheduler("tcp://127.0.0.1:0") as s:
            async with Nanny(s.address, memory_limit=0, local_directory=str(tmp_path)) as nanny:
                (scratch,) = os.listdir(tmp_path)
                first = set(os.listdir(tmp_path / scratch))
                assert len(first) == 1  # the worker's own directory, inside the nanny's
                await nanny.restart("SIGKILL leaves files behind")
                second = set(os.listdir(tmp_path / scratch))
                assert len(second) == 1 and second != first
            assert not os.listdir(tmp_path)
