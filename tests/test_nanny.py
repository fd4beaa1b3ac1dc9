"""The nanny with real worker processes: restarts, the memory terminate threshold, reaping."""

from __future__ import annotations

import builtins
import importlib
import logging
import os
import signal
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from trioscheduler import wire
from trioscheduler.client.client import Client
from trioscheduler.server import fork as fork_module
from trioscheduler.server.nanny import START_METHOD_ENV, Nanny, WorkerStartError
from trioscheduler.server.scheduler import Scheduler

TIMEOUT = 60

needs_fork = pytest.mark.skipif(not fork_module.fork_supported(), reason="fork needs Linux pidfd")
BOTH = pytest.mark.parametrize("method", [pytest.param("fork", marks=needs_fork), "spawn"])


def limit_for(method: str, nbytes: int) -> int:
    """A memory limit leaving the worker ``nbytes`` of its own: a forked child starts with
    our resident pages (the test process's, maybe hundreds of MiB) counted in its RSS."""
    return nbytes + (psutil.Process().memory_info().rss if method == "fork" else 0)


def hog(nbytes: int) -> int:
    data = b"x" * nbytes  # written, so resident
    time.sleep(30)
    return len(data)


@BOTH
async def test_restart_on_kill_and_on_request(
    caplog: pytest.LogCaptureFixture, method: str
) -> None:
    caplog.set_level(logging.INFO, logger="trioscheduler")
    with trio.fail_after(TIMEOUT):
        async with Scheduler("tcp://127.0.0.1:0") as s:
            limit = limit_for(method, 2**30)
            async with Nanny(
                s.address, nthreads=1, memory_limit=limit, name="n1", start_method=method
            ) as nanny:
                assert nanny.memory_limit == limit and nanny.started_by == method
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
                        "environment": None,  # the base one (trioscheduler.environments)
                    }
                    await stream.send({"op": "restart", "reason": "asked over the wire"})
                    reply = await stream.receive()
                    assert reply["status"] == "OK" and reply["worker"] == nanny.worker_address
                    assert reply["worker"] != second_addr and nanny.restarts == 2
                    assert nanny.started_by == method
                    await stream.send({"op": "dance"})
                    assert (await stream.receive())["status"] == "error"
                last_pid = nanny.pid
            assert nanny.status == "closed"
            assert not psutil.pid_exists(last_pid)  # type: ignore[arg-type]
    assert "testing restart" in caplog.text and "asked over the wire" in caplog.text


@BOTH
async def test_memory_terminate_threshold_kills_and_restarts(
    caplog: pytest.LogCaptureFixture, method: str
) -> None:
    caplog.set_level(logging.WARNING, logger="trioscheduler")
    limit = limit_for(method, 400 * 2**20)
    with trio.fail_after(TIMEOUT):
        async with Scheduler("tcp://127.0.0.1:0") as s:
            async with Nanny(
                s.address, nthreads=1, memory_limit=limit, start_method=method
            ) as nanny:
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


@needs_fork
async def test_forked_worker_failing_to_start_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(args: Any) -> None:
        raise RuntimeError("this worker cannot start")

    # a forked child runs this process's code, patched function included
    monkeypatch.setattr("trioscheduler.server.worker_process.run", broken)
    with trio.fail_after(TIMEOUT):
        async with Scheduler("tcp://127.0.0.1:0") as s:
            with pytest.raises(WorkerStartError, match="exited before joining"):
                async with Nanny(s.address, memory_limit=0, start_method="fork") as n:
                    raise AssertionError(f"should not start: {n}")


def test_start_method_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    address = "tcp://127.0.0.1:1"
    monkeypatch.delenv(START_METHOD_ENV, raising=False)
    assert Nanny(address).start_method == "auto"
    assert Nanny(address, start_method="spawn").fork_unsafe() == "start_method is 'spawn'"
    with pytest.raises(ValueError, match="start_method"):
        Nanny(address, start_method="forkserver")
    monkeypatch.setenv(START_METHOD_ENV, "spawn")
    assert Nanny(address).start_method == "spawn"
    assert Nanny(address, start_method="auto").start_method == "auto"
    if not fork_module.fork_supported():
        return
    assert Nanny(address, memory_limit=0, start_method="auto").fork_unsafe() is None
    assert "env=" in str(Nanny(address, memory_limit=0, env={}, start_method="fork").fork_unsafe())
    # a worker limit so small that this process's RSS would dominate the child's
    assert "MiB" in str(Nanny(address, memory_limit=2**20, start_method="auto").fork_unsafe())
    assert Nanny(address, memory_limit=2**20, start_method="fork").fork_unsafe() is None
    # a runtime that does not survive a fork: auto spawns, an explicit fork is obeyed
    monkeypatch.setitem(sys.modules, "jax", types.ModuleType("jax"))
    assert "jax" in str(Nanny(address, memory_limit=0, start_method="auto").fork_unsafe())
    assert Nanny(address, memory_limit=0, start_method="fork").fork_unsafe() is None


@needs_fork
async def test_no_fork_while_another_thread_imports(tmp_path: Path) -> None:
    """A module lock held by another thread would never be released in the child."""
    (tmp_path / "slow_to_import_mod.py").write_text(
        "import builtins\nbuiltins._slow_import_gate.wait(30)\n"
    )
    gate = threading.Event()
    builtins._slow_import_gate = gate  # type: ignore[attr-defined]
    sys.path.insert(0, str(tmp_path))
    importer = threading.Thread(target=importlib.import_module, args=("slow_to_import_mod",))
    importer.start()
    try:
        with trio.fail_after(TIMEOUT):
            while fork_module._module_being_imported() != "slow_to_import_mod":  # noqa: ASYNC110 - another thread's import
                await trio.sleep(0.01)
            async with Scheduler("tcp://127.0.0.1:0") as s:
                async with Nanny(s.address, memory_limit=0, start_method="fork") as nanny:
                    assert nanny.started_by == "spawn"
    finally:
        gate.set()
        importer.join()
        sys.path.remove(str(tmp_path))
        del builtins._slow_import_gate  # type: ignore[attr-defined]
        sys.modules.pop("slow_to_import_mod", None)
    assert fork_module._module_being_imported() is None


@needs_fork
async def test_forked_worker_holds_none_of_our_sockets() -> None:
    """Its inherited fds point at /dev/null: our listeners and pipes are not kept open."""
    with trio.fail_after(TIMEOUT):
        async with Scheduler("tcp://127.0.0.1:0") as s:
            async with Nanny(s.address, memory_limit=0, start_method="fork") as nanny:
                assert nanny.pid is not None and nanny.started_by == "fork"
                child = psutil.Process(nanny.pid)
                assert child.name() == "trioscheduler"
                ours = {c.laddr for c in psutil.Process().net_connections("tcp")}
                theirs = {c.laddr for c in child.net_connections("tcp")}
                assert ours and not ours & theirs
                worker_port = int(str(nanny.worker_address).rsplit(":", 1)[1])
                assert worker_port in {a.port for a in theirs}


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


@BOTH
async def test_spill_directories_of_killed_workers_are_removed(tmp_path: Path, method: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with Scheduler("tcp://127.0.0.1:0") as s:
            async with Nanny(
                s.address, memory_limit=0, local_directory=str(tmp_path), start_method=method
            ) as nanny:
                (scratch,) = os.listdir(tmp_path)
                first = set(os.listdir(tmp_path / scratch)) - {".lock"}  # the nanny's own lock
                assert len(first) == 1  # the worker's own directory, inside the nanny's
                await nanny.restart("SIGKILL leaves files behind")
                second = set(os.listdir(tmp_path / scratch)) - {".lock"}
                assert len(second) == 1 and second != first
            assert not os.listdir(tmp_path)


def freed_arrays_kept_resident() -> int:
    """RSS that 50 freed 4 MiB arrays leave behind, freed the way a spilling worker frees.

    Under glibc's default dynamic threshold, one freed 8 MiB array makes later arrays of a
    few MiB come from the heap, and with the newest one still alive none of them returns.
    """
    import numpy as np

    process = psutil.Process()
    first = np.ones(2**20)
    del first
    before = process.memory_info().rss
    arrays = [np.ones(2**19) for _ in range(50)]
    newest = arrays[-1]
    del arrays
    left = process.memory_info().rss - before
    del newest
    return int(left)


@BOTH
async def test_worker_returns_freed_memory_to_the_os(method: str) -> None:
    import numpy as np

    raise_threshold = np.ones(2**21)  # a 16 MiB free raises *our* dynamic mmap threshold,
    del raise_threshold  # which a forked child inherits unless it resets it
    with trio.fail_after(TIMEOUT):
        async with Scheduler("tcp://127.0.0.1:0") as s:
            async with Nanny(s.address, nthreads=1, memory_limit=0, start_method=method) as n:
                assert n.started_by == method
                async with Client(s.address, asynchronous=True) as c:
                    (left,) = (await c.run(freed_arrays_kept_resident)).values()
                    (env,) = (await c.run(lambda: dict(os.environ))).values()
    assert left < 50 * 2**20, f"{left / 2**20:.0f} MiB of freed arrays still resident"
    for name, value in fork_module.WORKER_ENVIRON.items():
        assert env.get(name) == os.environ.get(name, value)


async def test_worker_environ_leaves_a_users_choice_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    env = Nanny("tcp://127.0.0.1:1")._child_env()
    assert env["OMP_NUM_THREADS"] == "2" and env["MALLOC_TRIM_THRESHOLD_"] == "65536"
