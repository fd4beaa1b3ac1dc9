"""Instructions per round trip of our streams, for ``valgrind --tool=callgrind``.

``valgrind --tool=callgrind python -m benchmarks.callgrind_rtt tcp|tls``: 500 echo
round trips of a small dict over one stream (both ends in this process) to warm up, a
counter dump (``callgrind_control -d``, which zeroes the counters), 2,000 more round
trips, another dump. The second dump's ``summary:`` divided by 2,000 is the cost of one
round trip, start-up excluded (start-up under valgrind is not repeatable enough to
subtract whole runs). Wall time is too noisy on a shared machine to see a few percent.
"""

from __future__ import annotations

import os
import subprocess
import sys

import trio

from trioscheduler.wire import Stream, connect, listen
from trioscheduler.wire.security import Security, connect_args, listen_args

WARM_UP, COUNTED = 500, 2000


def _dump() -> None:
    subprocess.run(["callgrind_control", "-d", str(os.getpid())], check=True, capture_output=True)


async def main(scheme: str) -> None:
    security = Security.temporary() if scheme == "tls" else None
    server = listen_args(security, "scheduler") if security else {}
    client = connect_args(security, "client") if security else {}

    async def echo(stream: Stream) -> None:
        async for msg in stream:
            await stream.send(msg)

    async with listen(f"{scheme}://127.0.0.1:0", echo, **server) as lst:
        async with await connect(lst.address, **client) as stream:
            for count in (WARM_UP, COUNTED):
                for i in range(count):
                    await stream.send({"op": "ping", "i": i})
                    await stream.receive()
                await trio.to_thread.run_sync(_dump)


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else "tcp")
