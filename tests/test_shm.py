"""Same-host transfers through shared memory (``wire.shm``), with real worker processes.

What a user notices: a large array fetched by a worker on the same host is mapped from
the producer's segment (no copy in the receiver), the values are right, a receiver that
writes to it does not change anyone else's, and nothing is left behind in ``/dev/shm``
or in any process after close or ``kill -9`` of the sender or the receiver.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import numpy as np
import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from polling import eventually
from trioscheduler.client.client import Client
from trioscheduler.core import shm_policy
from trioscheduler.deploy.cluster import LocalCluster
from trioscheduler.wire import serialize, shm

pytestmark = pytest.mark.skipif(shm.HOST_ID is None, reason="no memfd on this system")

MB = 1 << 20


def make(n: int, seed: int) -> np.ndarray:
    return (np.arange(n, dtype=np.uint64) * 7 + seed).astype(np.uint8)


def probe(x: np.ndarray) -> dict[str, Any]:
    """Where ``x``'s bytes live in this worker process, and what this process counts."""
    addr = x.ctypes.data
    where = ""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
            if lo <= addr < hi:
                where = line.split(maxsplit=5)[5].strip() if len(line.split()) > 5 else ""
                break
    total = int(x.sum(dtype=np.uint64))  # reads every page
    rss = psutil.Process().memory_info().rss
    counted = shm_policy.process_memory(rss, shm.rss_shared(), shm.owned_bytes())
    return {"pid": os.getpid(), "where": where, "sum": total, "rss": rss, "counted": counted,
            "owned": shm.owned_bytes()}  # fmt: skip


def token_of(where: str) -> str:
    assert where.startswith("/memfd:" + shm.PREFIX), where
    return where[len("/memfd:" + shm.PREFIX) :].split(" ")[0]


def holders(token: str) -> list[int]:
    """Live processes of this test (us and our descendants) that hold the segment."""
    me = psutil.Process()
    pids = [me.pid, *(p.pid for p in me.children(recursive=True))]
    return [pid for pid in pids if token in shm.segments_of(pid)]



def dev_shm() -> set[str]:
    """What is in ``/dev/shm`` but POSIX semaphores (``sem.*``): other test runs on the
    machine create and remove multiprocessing's there all the time (ours never do: a
    process cluster makes none), which made the "nothing left" checks flaky."""
    if not os.path.isdir("/dev/shm"):
        return set()
    return {name for name in os.listdir("/dev/shm") if not name.startswith("sem.")}


def pid_of(c: Client, worker: str) -> int:
    return int(c.run(os.getpid, workers=[worker])[worker])


# ------------------------------------------------------------------ in one process


def test_shared_value_round_trip_is_copy_on_write() -> None:
    a = make(3 * MB, 1)
    sent, rebuilt = shm.share(a)
    assert isinstance(sent, shm.Shared) and sent.shared_bytes == a.nbytes
    assert np.array_equal(rebuilt, a)
    b = serialize.loads(serialize.dumps({"data": sent}))["data"]
    assert np.array_equal(b, a) and b.flags.writeable
    b[:10] = 255  # the receiver's write copies the page; the sender's value is unchanged
    assert np.array_equal(rebuilt, a)
    again, same = shm.share(rebuilt)  # already in a segment: referenced, not copied
    assert again.parts[0][3] == sent.parts[0][3] and same is not None


def test_small_values_are_not_shared() -> None:
    small = make(shm_policy.SHM_MIN_BYTES - 1, 0)
    assert shm.share(small) == (small, None)
    assert shm.share({"a": 1}) == ({"a": 1}, None)


def test_bad_references_are_refused_with_a_reason() -> None:
    sent, _ = shm.share(make(2 * MB, 3))
    host, pid, fd, token, gen, offset, size = sent.parts[0]
    with pytest.raises(shm.SharedMemoryError, match="another host"):
        shm.attach(("someone-else", pid, fd, token, gen, offset, size))
    with pytest.raises(shm.SharedMemoryError, match="malformed"):
        shm.attach((host, pid, fd, "../x", gen, offset, size))
    with pytest.raises(shm.SharedMemoryError, match="not segment"):
        shm.attach((host, pid, 0, token, gen, offset, size))  # stdin is not the segment
    with pytest.raises(shm.SharedMemoryError, match="has .* bytes"):
        shm.attach((host, pid, fd, token, gen, offset, size + 1))
    with pytest.raises(shm.SharedMemoryError, match="reused"):
        shm.attach((host, pid, fd, token, gen + 1, offset, size))
    with pytest.raises(serialize.DeserializationError, match="another host"):
        bad = shm.Shared(sent.data, [("x", pid, fd, token, gen, offset, size)], size)
        serialize.loads(serialize.dumps(bad))


def test_segments_are_reused_only_once_nobody_else_maps_them() -> None:
    shm.release_segments()
    sent, rebuilt = shm.share(make(2 * MB, 4))
    token = sent.parts[0][3]
    received = serialize.loads(serialize.dumps(sent))
    assert shm.owned_bytes() >= 2 * MB
    del sent, rebuilt  # the sender lets go; the receiver still maps it (its own lock)
    other, _ = shm.share(make(2 * MB, 5))
    assert other.parts[0][3] != token  # a receiver holds it: a new segment
    assert np.array_equal(received, make(2 * MB, 4))
    del received, other, _
    again, kept = shm.share(make(2 * MB, 6))  # now free: reused, a new generation
    assert again.parts[0][3] == token
    assert np.array_equal(serialize.loads(serialize.dumps(again)), make(2 * MB, 6))
    del again, kept
    shm.release_segments()
    assert token not in shm.segments_of(os.getpid()) and shm.owned_bytes() == 0


@given(
    local=st.one_of(st.none(), st.text(max_size=3)),
    peer=st.one_of(st.none(), st.integers(), st.text(max_size=3)),
    enabled=st.booleans(),
    peer_pid=st.one_of(st.none(), st.integers(1, 3)),
)
def test_policy_shares_only_between_processes_of_one_known_host(
    local: Any, peer: Any, enabled: bool, peer_pid: Any
) -> None:
    ok = shm_policy.use_shared_memory(local, peer, enabled, 2, peer_pid)
    assert ok == (enabled and local is not None and peer == local and bool(local) and peer_pid != 2)


@given(rss=st.integers(0, 1 << 40), shared=st.integers(0, 1 << 40), owned=st.integers(0, 1 << 40))
def test_process_memory_counts_only_own_segments(rss: int, shared: int, owned: int) -> None:
    shared = min(shared, rss)
    counted = shm_policy.process_memory(rss, shared, owned)
    assert counted == rss - shared + owned  # mapped or not, its own segments count once


# ------------------------------------------------------------- real worker processes


def test_same_host_fetch_maps_the_senders_segment() -> None:
    before = dev_shm()
    n = 16 * MB
    with LocalCluster(2, 1, processes=True, memory_limit=0) as cluster, Client(cluster) as c:
        a, b = sorted(c.scheduler_info()["workers"])
        x = c.submit(make, n, 5, workers=[a])
        on_b = c.submit(probe, x, workers=[b], pure=False).result()
        on_a = c.submit(probe, x, workers=[a], pure=False).result()
        assert on_b["sum"] == on_a["sum"] == int(make(n, 5).sum(dtype=np.uint64))
        token = token_of(on_b["where"])  # the receiver's array is the mapped segment
        assert token_of(on_a["where"]) == token  # the sender swapped its copy for it
        assert on_b["owned"] == 0 and on_a["owned"] >= n  # counted by its creator only
        assert on_b["rss"] - on_b["counted"] >= n * 9 // 10
        assert sorted(holders(token)) == sorted([on_a["pid"], on_b["pid"]])
    assert holders(token) == []
    assert dev_shm() <= before


@pytest.mark.parametrize("victim", ["sender", "receiver"])
def test_kill_9_leaves_nothing_behind(victim: str) -> None:
    before = dev_shm()
    n = 8 * MB
    with LocalCluster(2, 1, processes=True, memory_limit=0) as cluster, Client(cluster) as c:
        a, b = sorted(c.scheduler_info()["workers"])
        x = c.submit(make, n, 6, workers=[a])
        on_b = c.submit(probe, x, workers=[b], pure=False).result()
        token = token_of(on_b["where"])
        pid_a, pid_b = pid_of(c, a), pid_of(c, b)
        assert sorted(holders(token)) == sorted([pid_a, pid_b])
        dead, alive = (pid_a, pid_b) if victim == "sender" else (pid_b, pid_a)
        os.kill(dead, signal.SIGKILL)
        eventually(lambda: dead not in holders(token), "the dead holder dropped", 30)
        assert holders(token) == [alive]  # the survivor's copy is intact
        if victim == "sender":
            eventually(lambda: a not in c.scheduler_info()["workers"], "the worker gone", 30)
            again = c.submit(probe, x, workers=[b], pure=False).result()
            assert again["sum"] == on_b["sum"] and token_of(again["where"]) == token
        os.kill(alive, signal.SIGKILL)
        eventually(lambda: holders(token) == [], "no holder left", 30)
    assert dev_shm() <= before


def _spill(key: Any, dask_worker: Any) -> bool:
    return bool(dask_worker.store.spill(key)) and key in dask_worker.store.spilled


def test_a_shared_value_spills_and_comes_back_right() -> None:
    n = 8 * MB
    with LocalCluster(2, 1, processes=True, memory_limit=0) as cluster, Client(cluster) as c:
        a, b = sorted(c.scheduler_info()["workers"])
        x = c.submit(make, n, 7, workers=[a])
        on_b = c.submit(probe, x, workers=[b], pure=False).result()
        token = token_of(on_b["where"])
        pid_b = pid_of(c, b)
        assert c.run(_spill, x.key, workers=[b])[b] is True
        assert pid_b not in holders(token)  # spilling let the segment go on B
        back = c.submit(probe, x, workers=[b], pure=False).result()
        assert back["sum"] == on_b["sum"] and not back["where"].startswith("/memfd:")
        assert c.run(_spill, x.key, workers=[a])[a] is True  # the sender's copy too
        assert holders(token) in ([], [pid_of(c, a)])  # at most in A's pool of free segments


def _segments_cannot_be_mapped() -> None:
    """What a host that forbids opening another process's descriptors does (we cannot
    run such a kernel here, so the worker's own ``attach`` is made to fail that way)."""

    def refuse(ref: Any) -> Any:
        raise shm.SharedMemoryError("opening /proc/<pid>/fd: permission denied")

    shm.attach = refuse


def test_a_receiver_that_cannot_map_falls_back_to_the_socket() -> None:
    n = 4 * MB
    with LocalCluster(2, 1, processes=True, memory_limit=0) as cluster, Client(cluster) as c:
        a, b = sorted(c.scheduler_info()["workers"])
        c.run(_segments_cannot_be_mapped, workers=[b])
        x = c.submit(make, n, 8, workers=[a])
        on_b = c.submit(probe, x, workers=[b], pure=False).result()
        assert on_b["sum"] == int(make(n, 8).sum(dtype=np.uint64))
        assert not on_b["where"].startswith("/memfd:")  # it came through the socket
        y = c.submit(make, n, 9, workers=[a])  # and so does the next, without a failure first
        assert c.submit(probe, y, workers=[b], pure=False).result()["sum"] == int(
            make(n, 9).sum(dtype=np.uint64)
        )


async def test_in_process_workers_get_values_by_reference() -> None:
    from trioscheduler.deploy.cluster import open_cluster

    async with open_cluster(2, 1, processes=False, memory_limit=0) as cluster:
        async with Client(cluster, asynchronous=True) as c:
            a, b = sorted((await c.scheduler_info())["workers"])
            x = c.submit(make, 2 * MB, 1, workers=[a])
            on_b = await c.submit(probe, x, workers=[b], pure=False)
            assert on_b["sum"] == int(make(2 * MB, 1).sum(dtype=np.uint64))
            assert not on_b["where"].startswith("/memfd:")
