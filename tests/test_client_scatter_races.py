"""Scatter against what happens while it runs: a future of the same key dropped meanwhile.

The cluster (scheduler and worker, ``processes=False``) runs in its own loop thread, the
asynchronous client in the test's. A scheduler plugin's hook, which runs inside the
scheduler's feed of the client's ``update_data``, is where the test acts; it waits there
until the client has taken in what the hook did, so the interleaving is the same every
run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing

from trioscheduler import Client, LocalCluster, SchedulerPlugin

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
