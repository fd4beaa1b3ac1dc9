"""upload_file, run, run_on_scheduler, restart, scheduler_info, wait_for_workers."""

from __future__ import annotations

import importlib
import os
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest
import trio

from trioscheduler import (
    Client,
    FutureCancelledError,
    LocalCluster,
    Scheduler,
    Worker,
    get_worker,
    worker_client,
)

TIMEOUT = 60


def value_of(module: str) -> Any:
    return importlib.import_module(module).VALUE


def where_and_value(module: str) -> tuple[str, Any]:
    return get_worker().address, importlib.import_module(module).VALUE


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def write_zip(path: Path, package: str, value: int, egg: bool = False) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{package}/__init__.py", "from .inner import VALUE\n")
        z.writestr(f"{package}/inner.py", f"VALUE = {value}\n")
        if egg:
            z.writestr("EGG-INFO/PKG-INFO", "Name: x\n")
    return path


async def test_upload_py_zip_egg_and_a_syntax_error(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        for address in (f"inproc://up-{os.getpid()}", "tcp://127.0.0.1:0"):
            async with Scheduler(address) as s:
                async with (
                    Worker(s.address, nthreads=1, memory_limit=0, local_directory=str(tmp_path)),
                    Worker(s.address, nthreads=1, memory_limit=0),
                    Client(s.address, asynchronous=True) as c,
                ):
                    await c.wait_for_workers(2)
                    name = unique("upmod")
                    source = tmp_path / f"{name}.py"
                    source.write_text("VALUE = 1\n")
                    assert len(await c.upload_file(str(source))) == 2
                    assert await c.submit(value_of, name, pure=False) == 1
                    source.write_text("VALUE = 2\n")  # a new version replaces the old
                    await c.upload_file(str(source))
                    assert await c.submit(value_of, name, pure=False) == 2

                    for suffix in (".zip", ".egg"):
                        package = unique("zpkg")
                        archive = write_zip(
                            tmp_path / f"{package}{suffix}", package, 7, suffix == ".egg"
                        )
                        await c.upload_file(str(archive))
                        assert await c.submit(value_of, package, pure=False) == 7

                    bad = tmp_path / f"{unique('bad')}.py"
                    bad.write_text("def broken(:\n")
                    with pytest.raises(SyntaxError) as info:
                        await c.upload_file(str(bad))
                    note = "\n".join(info.value.__notes__)
                    assert "failed on 2 of 2 workers" in note
                    for w in await c.nthreads():
                        assert w in note
                    assert len(await c.nthreads()) == 2  # the workers keep running
                    assert await c.submit(value_of, name, pure=False) == 2
                    with pytest.raises(ValueError, match=r"\.py, \.zip, \.egg"):
                        await c.upload_file(str(tmp_path / "data.txt"))


def imported(module: str) -> bool:
    import sys

    return module in sys.modules


async def test_upload_without_loading_imports_at_first_use(tmp_path: Path) -> None:
    """``upload_file(load=False)``, as dask's: the file is in place on every worker but
    not imported (a broken file uploads fine); a task's import reads the newest version."""
    with trio.fail_after(TIMEOUT):
        async with Scheduler(f"inproc://noload-{os.getpid()}") as s:
            async with (
                Worker(s.address, nthreads=1, memory_limit=0, local_directory=str(tmp_path)),
                Client(s.address, asynchronous=True) as c,
            ):
                await c.wait_for_workers(1)
                name = unique("lazymod")
                source = tmp_path / f"{name}.py"
                source.write_text("VALUE = 1\n")
                assert len(await c.upload_file(str(source), load=False)) == 1
                assert await c.run(imported, name) == {w: False for w in await c.nthreads()}
                assert await c.submit(value_of, name, pure=False) == 1
                source.write_text("VALUE = 2\n")  # imported before: the new file wins
                await c.upload_file(str(source), load=False)
                assert await c.submit(value_of, name, pure=False) == 2

                broken = tmp_path / f"{unique('lazybad')}.py"
                broken.write_text("def broken(:\n")
                await c.upload_file(str(broken), load=False)  # never imported: no error
                future = c.submit(value_of, broken.stem, pure=False)
                with pytest.raises(SyntaxError):
                    await future


def add_one(x: int, dask_worker: Any = None) -> tuple[int, str]:
    return x + 1, dask_worker.address


def fail_on(address: str, dask_worker: Any) -> str:
    if dask_worker.address == address:
        raise ZeroDivisionError(f"failing on {address}")
    return "ok"


def scheduler_side(dask_scheduler: Any) -> int:
    return len(dask_scheduler.state.workers)


async def test_run_and_run_on_scheduler() -> None:
    with trio.fail_after(TIMEOUT):
        for address in (f"inproc://run-{os.getpid()}", "tcp://127.0.0.1:0"):
            async with Scheduler(address) as s:
                async with (
                    Worker(s.address, nthreads=1, memory_limit=0, name="alice") as a,
                    Worker(s.address, nthreads=1, memory_limit=0) as b,
                    Client(s.address, asynchronous=True) as c,
                ):
                    await c.wait_for_workers(2)
                    assert await c.run(add_one, 1) == {
                        a.address: (2, a.address),
                        b.address: (2, b.address),
                    }
                    assert await c.run(add_one, 1, workers=["alice"]) == {a.address: (2, a.address)}
                    with pytest.raises(ZeroDivisionError, match="failing on"):
                        await c.run(fail_on, b.address)
                    got = await c.run(fail_on, b.address, on_error="return")
                    assert got[a.address] == "ok" and isinstance(got[b.address], ZeroDivisionError)
                    assert await c.run(fail_on, b.address, on_error="ignore") == {a.address: "ok"}
                    with pytest.raises(ValueError, match="on_error"):
                        c.run(add_one, 1, on_error="skip")
                    assert await c.run_on_scheduler(scheduler_side) == 2
                    assert await c.run_on_scheduler(lambda x: x * 2, 21) == 42
                    with pytest.raises(ZeroDivisionError):
                        await c.run_on_scheduler(lambda: 1 / 0)
                    info = await c.scheduler_info()
                    assert info["address"] == s.address and set(info["workers"]) == {
                        a.address,
                        b.address,
                    }
                    assert info["workers"][a.address]["name"] == "alice"
                    with pytest.raises(TimeoutError, match="only 2 of 3 workers"):
                        await c.wait_for_workers(3, timeout=0.2)


def slow_inc(x: int) -> int:
    return x + 1


def fib(n: int) -> int:
    if n < 2:
        return n
    with worker_client() as client:
        return int(sum(client.gather([client.submit(fib, n - 1), client.submit(fib, n - 2)])))


def restart_and_upload(tmp: str) -> None:
    """Processes: nannies restart every worker; uploads reach restarted and new workers."""
    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit=0) as cluster:
        with Client(cluster) as c:
            name = unique("restarted")
            source = Path(tmp) / f"{name}.py"
            source.write_text("VALUE = 'uploaded'\n")
            c.upload_file(str(source))
            f = c.submit(slow_inc, 1)
            assert f.result() == 2
            pids = set(c.run(os.getpid).values())
            c.restart()
            assert f.status == "cancelled"
            with pytest.raises(FutureCancelledError, match="restarted"):
                f.result()
            assert set(c.run(os.getpid).values()).isdisjoint(pids)  # new processes
            assert len(c.nthreads()) == 2
            assert c.submit(slow_inc, 1).result() == 2  # the same key runs again
            assert c.submit(fib, 9).result() == 34  # tasks launching tasks in worker processes
            cluster.scale(3)
            c.wait_for_workers(3)
            newest = sorted(c.nthreads())
            values = {
                c.submit(where_and_value, name, workers=[w], pure=False).result() for w in newest
            }
            assert {v for _, v in values} == {"uploaded"} and len(values) == 3


def restart_in_process() -> None:
    with Client(processes=False, n_workers=2, threads_per_worker=1) as c:
        f = c.submit(slow_inc, 1)
        assert f.result() == 2
        before = set(c.nthreads())
        c.restart()
        assert f.cancelled()
        after = set(c.nthreads())
        assert len(after) == 2 and after.isdisjoint(before)
        assert c.submit(slow_inc, 10).result() == 11


async def test_restart(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        await trio.to_thread.run_sync(restart_in_process)
        await trio.to_thread.run_sync(restart_and_upload, str(tmp_path))
