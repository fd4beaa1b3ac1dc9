"""kill -9 of the scheduler process mid-graph, restarted from its log (issue 18).

Real processes: the ``trioscheduler scheduler --recover-from LOG`` command, two nanny
workers, a client in this process. In one process: ``tests/test_recovery.py``.
"""

from __future__ import annotations

import operator
import signal
import socket
import time
from pathlib import Path

import trio

from test_cli import spawn, stop
from trioscheduler.client.client import Client
from trioscheduler.server import event_log

TIMEOUT = 90
LEAVES = 1000  # and 999 sums and one last step: 2,000 tasks


def slow_inc(x: int) -> int:
    time.sleep(0.005)
    return x + 1


def inc(x: int) -> int:
    return x + 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_kill_9_mid_graph_and_restart_from_the_log(tmp_path: Path) -> None:
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    log = tmp_path / "scheduler.log"
    sched_args = (
        "scheduler", "--port", str(port), "--recover-from", str(log),
        "--log-fsync-interval", "0.2", "--no-dashboard",
    )  # fmt: skip
    worker_args = (
        "worker",
        address,
        "--nthreads",
        "2",
        "--memory-limit",
        "0",
        "--death-timeout",
        "60",
    )
    with trio.fail_after(TIMEOUT):
        async with spawn(tmp_path, "scheduler-1", *sched_args) as first:
            while not log.exists():  # noqa: ASYNC110 - another process writes it
                await trio.sleep(0.05)
            async with (
                spawn(tmp_path, "w1", *worker_args) as w1,
                spawn(tmp_path, "w2", *worker_args) as w2,
                Client(address, asynchronous=True, timeout=20, reconnect_timeout=60) as c,
            ):
                await c.wait_for_workers(2)
                leaves = c.map(slow_inc, range(LEAVES))
                level = leaves
                while len(level) > 1:
                    pairs = [level[i : i + 2] for i in range(0, len(level), 2)]
                    level = [c.submit(operator.add, *p) if len(p) == 2 else p[0] for p in pairs]
                final = c.submit(inc, level[0])
                while sum(f.done() for f in leaves) < LEAVES // 4:  # noqa: ASYNC110 - progress of futures
                    await trio.sleep(0.01)
                done_before = sum(f.done() for f in leaves)
                first.process.send_signal(signal.SIGKILL)  # mid-graph, no goodbye
                assert await first.process.wait() == -signal.SIGKILL
                assert not final.done()
                contents = event_log.read_log(log)
                assert contents.frames > 100  # the graph and progress are in the log
                async with spawn(tmp_path, "scheduler-2", *sched_args) as second:
                    assert await final == sum(range(1, LEAVES + 1)) + 1
                    assert c._link.reconnections == 1
                    assert all(f.done() for f in leaves)
                    assert await stop(second) == 0
                for p in (w1, w2):
                    assert "rejoined" in p.stderr(), p.stderr()
                    assert "restarting" not in p.stderr()  # the same worker processes
            err = second.stderr()
            assert "recovered from" in err, err
            assert "Traceback" not in err, err
            assert done_before < LEAVES
