"""Scatter against what happens while it runs: a future of the same key dropped meanwhile.

The cluster (scheduler and worker, ``processes=False``) runs in its own loop thread, the
asynchronous client in the test's. A scheduler plugin's hook, which runs inside the
scheduler's feed of the client's ``update_data``, is where the test acts; it waits there
until the client has taken in what the hook did, so the interleaving is the same every
run.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio
import trio.testing

from polling import wait_until
from trioscheduler import Client, LocalCluster, Scheduler, SchedulerPlugin, Worker, WorkerPlugin

TIMEOUT = 30

SHARED: dict[str, Any] = {}
"""What the hook (in the cluster's thread) and the test share: the plugin is pickled."""


class DropOnMemory(SchedulerPlugin):
    """When the key ``trigger`` goes to memory (inside the scheduler's feed of a scatter's
    ``update_data``), the user's last future of another key is dropped, and the hook
    returns once the client has counted the drop (released the key, or not)."""

    name = "drop-on-memory"

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if key != "trigger" or finish != "memory" or "old" not in SHARED:
            return
        old = SHARED.pop("old")
        client, key = old.client, old.key
        old.release()
        deadline = time.monotonic() + 10
        while key in client.futures and not client.futures.refcount.get(key):
            assert time.monotonic() < deadline, "the client never handled the drop"
            time.sleep(0.001)


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(1, 1, processes=False, protocol="tcp://", memory_limit=0) as cluster:
        yield cluster


async def test_a_future_dropped_while_the_same_value_is_scattered_again_keeps_the_key(
    cluster: LocalCluster,
) -> None:
    """A value scattered twice has the same (hashed) key. The first future is dropped while
    the second scatter registers its data with the scheduler: the key stays on the
    cluster, held by the new future (the old future's release must not land after the
    registration and take the key, and the new copy, away)."""
    with trio.fail_after(TIMEOUT):
        async with Client(cluster.scheduler_address, asynchronous=True) as c:
            await c.wait_for_workers(1)
            [worker] = await c.nthreads()
            [SHARED["old"]] = await c.scatter(["payload"])
            key = SHARED["old"].key
            await c.register_plugin(DropOnMemory())
            # the same value under its hashed key, and a new key beside it (the trigger)
            out = await c.scatter({key: "payload", "trigger": "new"})
            assert "old" not in SHARED  # dropped during the scatter, by the plugin
            new = out[key]
            await trio.testing.wait_all_tasks_blocked()
            assert await c.who_has(new) == {key: [worker]}  # after the release, in order
            assert await new == "payload"
            assert await c.submit(len, new) == len("payload")


GATE = threading.Event()
"""Opened by the test: until then the worker named ``slow`` holds up its ``update_data``."""
ENTERED = threading.Event()


class HoldUpdates(WorkerPlugin):
    """On the worker named ``slow``: a scattered value's transition to memory (inside the
    worker's ``update_data``, before its reply) waits for ``GATE``; its whole loop waits."""

    name = "hold-updates"

    def setup(self, worker: Any) -> None:
        self.worker = worker

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if self.worker.name == "slow" and finish == "memory" and not GATE.is_set():
            ENTERED.set()
            assert GATE.wait(TIMEOUT), "the test never opened the gate"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_slow_worker(scheduler: str, stop: threading.Event) -> None:
    """A worker in a trio run of its own (this thread), so its held-up ``update_data``
    stops nothing else."""

    async def main() -> None:
        async with Worker(scheduler, nthreads=1, name="slow", memory_limit=0):
            await trio.to_thread.run_sync(stop.wait)

    trio.run(main)


async def test_a_scatter_to_a_worker_that_restarts_at_its_address_meanwhile() -> None:
    """A scatter puts one value on worker ``a`` and one on ``slow``. ``a``'s process (here:
    its ``Worker``) ends after it took the value, and a new one registers at the same
    address, before the client registers the scatter with the scheduler (it waits for
    ``slow``). The scheduler must not believe the new ``a`` holds the value: every
    holder ``who_has`` names has it, and both values come back."""
    GATE.clear()
    ENTERED.clear()
    stop = threading.Event()
    address_a = f"tcp://127.0.0.1:{_free_port()}"
    with trio.fail_after(TIMEOUT):
        async with (
            Scheduler("tcp://127.0.0.1:0", validate=True) as s,
            Client(s.address, asynchronous=True) as c,
            trio.open_nursery() as nursery,
        ):
            slow = threading.Thread(target=_run_slow_worker, args=(s.address, stop))
            slow.start()
            try:
                async with AsyncExitStack() as first:
                    await first.enter_async_context(
                        Worker(s.address, address=address_a, nthreads=1, memory_limit=0)
                    )
                    await c.wait_for_workers(2)
                    await c.register_plugin(HoldUpdates())
                    out: list[Any] = []

                    async def scatter() -> None:
                        out.extend(await c.scatter(["one", "two"]))

                    nursery.start_soon(scatter)
                    assert await trio.to_thread.run_sync(ENTERED.wait, TIMEOUT)
                    await trio.testing.wait_all_tasks_blocked()  # ``a`` has answered
                # ``a`` is gone; a new worker takes its address
                await wait_until(lambda: address_a not in s.state.workers)
                async with Worker(s.address, address=address_a, nthreads=1, memory_limit=0) as a2:
                    await wait_until(lambda: address_a in s.state.workers)
                    GATE.set()
                    await wait_until(lambda: len(out) == 2)
                    held_by_a2 = set(a2.store or ())
                    who_has = await c.who_has(out)
                    for key, holders in who_has.items():
                        assert address_a not in holders or key in held_by_a2, (key, who_has)
                    assert await c.gather(out) == ["one", "two"]
            finally:
                GATE.set()
                stop.set()
                await trio.to_thread.run_sync(slow.join)
