"""What waking a sleeping process costs on this host, the reason for ``wire.busy_poll``.

``python -m benchmarks.wake_cost [N]``: two processes ping-pong one byte over a Unix
socket pair ``N`` times (20,000 by default), first with each side sleeping in ``recv``
until the byte comes, then with each side polling (``MSG_DONTWAIT`` in a loop, up to
0.5 ms, then sleeping), twice each, alternated. Prints one JSON line: the median round
trip in microseconds of each way. The difference is two wake-ups per round.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import time

SPIN_S = 0.0005


def _receive(sock: socket.socket, poll: bool) -> bytes:
    if poll:
        end = time.perf_counter() + SPIN_S
        while time.perf_counter() < end:
            try:
                return sock.recv(64, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
    return sock.recv(64)


def round_trip_us(n: int, poll: bool) -> float:
    """Median microseconds of ``n`` one-byte round trips to a forked child."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        parent.close()
        for _ in range(n):
            _receive(child, poll)
            child.send(b"x")
        os._exit(0)
    child.close()
    times = []
    ns = time.perf_counter_ns
    for _ in range(n):
        start = ns()
        parent.send(b"x")
        _receive(parent, poll)
        times.append(ns() - start)
    os.waitpid(pid, 0)
    parent.close()
    return statistics.median(times) / 1e3


def main(argv: list[str]) -> None:
    n = int(argv[0]) if argv else 20_000
    sleeping, polling = [], []
    for _ in range(2):
        sleeping.append(round_trip_us(n, poll=False))
        polling.append(round_trip_us(n, poll=True))
    print(json.dumps({
        "sleeping_us": statistics.median(sleeping), "polling_us": statistics.median(polling),
        "samples": {"sleeping": sleeping, "polling": polling}, "load": os.getloadavg()[0],
    }))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
