"""dask's ``scheduler`` / ``worker`` options on our command, in real processes (issue 18):
--nworkers auto, --worker-port / --nanny-port, --preload / --preload-nanny, --lifetime
(-stagger, -restart), --death-timeout, --pid-file, --idle-timeout, --interface,
--listen-address / --contact-address."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from test_cli import spawn, stop, wait_for_file
from trioscheduler.cli.main import build_parser
from trioscheduler.client.client import Client
from trioscheduler.server.worker_process import auto_nworkers, parse_ports, parse_seconds

TIMEOUT = 60

PRELOAD = """
import json, os, sys

def dask_setup(server):
    with open(os.path.join({out!r}, f"setup-{{type(server).__name__}}-{{os.getpid()}}-{{id(server)}}.json"), "w") as f:
        json.dump({{"address": server.address}}, f)

async def dask_teardown(server):
    with open(os.path.join({out!r}, f"teardown-{{type(server).__name__}}-{{os.getpid()}}-{{id(server)}}"), "w"):
        pass
"""


def _free_ports(n: int) -> list[int]:
    """``n`` consecutive free ports (checked free now)."""
    for base in range(41000, 60000, 97):
        ports = list(range(base, base + n))
        socks = []
        try:
            for p in ports:
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return ports
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def _names(folder: Path, pattern: str) -> set[str]:
    return {p.name for p in folder.glob(pattern)}


def _preload(tmp_path: Path) -> str:
    path = tmp_path / "setup_hooks.py"
    path.write_text(PRELOAD.format(out=str(tmp_path)))
    return str(path)


def test_option_values_parse_as_dask_takes_them() -> None:
    assert auto_nworkers(1) == (1, 1)
    assert auto_nworkers(4) == (4, 1)
    assert auto_nworkers(8) == (4, 2)
    assert auto_nworkers(12) == (4, 3)
    assert auto_nworkers(16) == (4, 4)
    assert parse_ports("9000:9002") == [9000, 9001, 9002]
    assert parse_seconds("90") == 90.0
    assert parse_seconds("1 hour") == 3600.0
    assert parse_seconds("5m") == 300.0
    args = build_parser().parse_args(["worker", "tcp://h:1", "--nworkers", "auto"])
    assert args.nworkers == "auto"
    for bad in (["--nworkers", "0"], ["--worker-port", "abc"], ["--lifetime", "soon"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["worker", "tcp://h:1", *bad])
    with pytest.raises(argparse.ArgumentTypeError, match="within 0..65535"):
        parse_ports("9000:70000")


def test_unknown_interface_and_missing_scheduler_fail_at_start_with_a_clear_message() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "trioscheduler", "worker", "tcp://127.0.0.1:9", "--no-nanny",
         "--interface", "no-such-if0"],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert out.returncode != 0
    assert "no network interface 'no-such-if0'" in out.stderr
    assert "lo" in out.stderr  # the interfaces there are, named
    port = _free_ports(1)[0]  # nothing listens there
    out = subprocess.run(
        [sys.executable, "-m", "trioscheduler", "worker", f"tcp://127.0.0.1:{port}",
         "--no-nanny", "--death-timeout", "1"],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert out.returncode == 1
    assert f"127.0.0.1:{port}" in out.stderr


@pytest.mark.slow
async def test_scheduler_pid_file_preload_and_idle_timeout(tmp_path: Path) -> None:
    pid_path, sched_file = tmp_path / "scheduler.pid", tmp_path / "scheduler.json"
    with trio.fail_after(TIMEOUT):
        async with spawn(
            tmp_path, "scheduler", "scheduler", "--port", "0", "--scheduler-file",
            str(sched_file), "--pid-file", str(pid_path), "--preload", _preload(tmp_path),
            "--idle-timeout", "1.5",
        ) as sched:  # fmt: skip
            address = (await wait_for_file(sched_file))["address"]
            assert int(pid_path.read_text()) == sched.process.pid
            (setup_file,) = _names(tmp_path, "setup-Scheduler-*.json")
            setup = json.loads((tmp_path / setup_file).read_text())
            assert setup["address"] == address
            async with Client(address, asynchronous=True) as c:
                assert await c.run_on_scheduler(lambda: 1) == 1
            # no work at all: it closes itself after the idle timeout, cleanly
            assert await sched.process.wait() == 0
            assert not pid_path.exists()
            assert _names(tmp_path, "teardown-Scheduler-*")


@pytest.mark.slow
async def test_worker_ports_preloads_and_lifetime_restart(tmp_path: Path) -> None:
    ports = _free_ports(4)
    worker_ports, nanny_ports = ports[:2], ports[2:]
    sched_file, pid_path = tmp_path / "scheduler.json", tmp_path / "worker.pid"
    preload = _preload(tmp_path)
    with trio.fail_after(TIMEOUT):
        async with spawn(
            tmp_path, "scheduler", "scheduler", "--port", "0", "--scheduler-file", str(sched_file)
        ):
            address = (await wait_for_file(sched_file))["address"]
            async with (
                spawn(
                    tmp_path, "worker", "worker", address, "--nworkers", "2", "--nthreads", "1",
                    "--worker-port", f"{worker_ports[0]}:{worker_ports[1]}",
                    "--nanny-port", f"{nanny_ports[0]}:{nanny_ports[1]}",
                    "--preload", preload, "--preload-nanny", preload,
                    "--lifetime", "6", "--lifetime-restart", "--pid-file", str(pid_path),
                ) as worker,
                Client(address, asynchronous=True) as c,
            ):  # fmt: skip
                await c.wait_for_workers(2)
                info = await c.scheduler_info()
                assert sorted(info["workers"]) == [f"tcp://127.0.0.1:{p}" for p in worker_ports]
                assert int(pid_path.read_text()) == worker.process.pid
                nannies = [w["nanny"] for w in info["workers"].values()]
                assert sorted(nannies) == [f"tcp://127.0.0.1:{p}" for p in nanny_ports]
                assert len(_names(tmp_path, "setup-Nanny-*.json")) == 2
                first = _names(tmp_path, "setup-Worker-*.json")
                assert len(first) == 2
                # past their lifetime the workers retire and their nannies start new ones,
                # on the same ports; each new worker ran the preload again
                while len(_names(tmp_path, "setup-Worker-*.json") - first) < 2:  # noqa: ASYNC110
                    await trio.sleep(0.1)  # the worker processes write them
                await c.wait_for_workers(2)
                assert await c.submit(sum, [1, 2], pure=False) == 3
                assert len(_names(tmp_path, "teardown-Worker-*")) >= 2
                assert await stop(worker) == 0
            assert not pid_path.exists()


@pytest.mark.slow
async def test_listen_address_and_contact_address(tmp_path: Path) -> None:
    """A worker behind an address translation: it listens on one address and tells the
    scheduler and its peers another (here 127.0.0.2, which Linux routes to loopback)."""
    port = _free_ports(1)[0]
    sched_file = tmp_path / "scheduler.json"
    with trio.fail_after(TIMEOUT):
        async with spawn(
            tmp_path, "scheduler", "scheduler", "--port", "0", "--scheduler-file", str(sched_file)
        ):
            address = (await wait_for_file(sched_file))["address"]
            async with (
                spawn(
                    tmp_path, "worker", "worker", address,  # under a nanny
                    "--listen-address", f"tcp://0.0.0.0:{port}",
                    "--contact-address", f"tcp://127.0.0.2:{port}",
                ),
                Client(address, asynchronous=True) as c,
            ):  # fmt: skip
                await c.wait_for_workers(1)
                assert list((await c.scheduler_info())["workers"]) == [f"tcp://127.0.0.2:{port}"]
                future = c.submit(bytes, 1000)
                assert await c.gather(future) == bytes(1000)  # fetched via the contact address


@pytest.mark.slow
async def test_a_scheduler_stopped_in_order_closes_its_workers_unless_told_not_to(
    tmp_path: Path,
) -> None:
    """dask's behaviour: SIGTERM to the scheduler closes the workers and their nannies at
    once, however long their --death-timeout. With --no-close-workers (a restart on
    purpose) they stay, and rejoin the scheduler started again at the same address."""
    port = _free_ports(1)[0]
    address = f"tcp://127.0.0.1:{port}"
    with trio.fail_after(TIMEOUT):
        async with spawn(
            tmp_path, "worker", "worker", address, "--death-timeout", "3600", "--nthreads", "1"
        ) as worker:
            async with spawn(
                tmp_path, "scheduler1", "scheduler", "--port", str(port), "--no-close-workers"
            ) as first:
                async with Client(address, asynchronous=True) as c:
                    await c.wait_for_workers(1)
                    (before,) = (await c.scheduler_info())["workers"]
                assert await stop(first) == 0
            async with spawn(tmp_path, "scheduler2", "scheduler", "--port", str(port)) as second:
                async with Client(address, asynchronous=True) as c:
                    await c.wait_for_workers(1)  # the same worker, not restarted: rejoined
                    assert list((await c.scheduler_info())["workers"]) == [before]
                    assert await c.submit(sum, [1, 2], pure=False) == 3
                assert worker.process.returncode is None
                assert await stop(second) == 0
                assert await worker.process.wait() == 0  # the nanny and its worker closed
    assert "scheduler-close" in worker.stderr()
