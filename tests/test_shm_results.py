"""Large results placed in shared memory as their task returns (``same_host.ResultPlacer``).

What a user notices: once a worker has a peer on its host, a large result it computes is
already in a shared segment when the task ends, so a same-host fetch maps it; the values
are right, the bytes are counted once on the host (by the producer), a spilled result lets
its segment go, and nothing is left in ``/dev/shm`` or in any process after close or
``kill -9``. ``distributed.worker.shared-memory.place-results`` switches it.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import dask.config
import numpy as np
import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from polling import eventually
from test_shm import dev_shm, holders, make, pid_of, probe, token_of
from trioscheduler.client.client import Client
from trioscheduler.core import shm_policy
from trioscheduler.deploy.cluster import LocalCluster
from trioscheduler.server import same_host
from trioscheduler.wire import shm

pytestmark = pytest.mark.skipif(shm.HOST_ID is None, reason="no memfd on this system")

MB = 1 << 20
N = 20 * MB  # above the placing threshold (16 MiB)


def expected(seed: int) -> int:
    return int(make(N, seed).sum(dtype=np.uint64))


def _meet(c: Client, a: str, b: str) -> None:
    """A small exchange from ``a`` to ``b``: the two workers now know they share a host."""
    small = c.submit(make, 2 * MB, 0, workers=[a], pure=False)
    c.submit(probe, small, workers=[b], pure=False).result()


def test_a_large_result_is_in_shared_memory_when_its_task_returns() -> None:
    before = dev_shm()
    with LocalCluster(2, 1, processes=True, memory_limit=0) as cluster, Client(cluster) as c:
        a, b = sorted(c.scheduler_info()["workers"])
        lone = c.submit(make, N, 1, workers=[a], pure=False)
        on_a = c.submit(probe, lone, workers=[a], pure=False).result()
        assert not on_a["where"].startswith("/memfd:")  # no peer on this host known yet
        _meet(c, a, b)
        x = c.submit(make, N, 2, workers=[a], pure=False)
        on_a = c.submit(probe, x, workers=[a], pure=False).result()
        token = token_of(on_a["where"])  # placed as it returned, before any fetch
        assert on_a["sum"] == expected(2) and on_a["owned"] >= N
        assert on_a["counted"] >= N  # the producer counts the segment
        on_b = c.submit(probe, x, workers=[b], pure=False).result()
        assert token_of(on_b["where"]) == token and on_b["sum"] == expected(2)
        assert on_b["owned"] == 0 and on_b["rss"] - on_b["counted"] >= N * 9 // 10
        assert sorted(holders(token)) == sorted([on_a["pid"], on_b["pid"]])

        def reported(worker: str, since: float) -> int | None:  # what the dashboards see
            metrics = c.scheduler_info()["workers"][worker]["metrics"]
            return int(metrics["memory"]) if metrics.get("time", 0) > since else None

        since = time.time()
        for worker in (a, b):  # each one's first heartbeat after both hold x
            eventually(
                lambda w=worker: reported(w, since) is not None, f"a heartbeat from {worker}", 30
            )
        assert (reported(b, since) or 0) < on_b["rss"] - N // 2  # B maps it: not B's memory
        assert (reported(a, since) or 0) >= N  # A counts it
    assert holders(token) == []
    assert dev_shm() <= before


@pytest.mark.parametrize("mode", ["always", "never"])
def test_place_results_setting(mode: str) -> None:
    with dask.config.set({same_host.PLACE_KEY: mode}):
        with LocalCluster(2, 1, processes=True, memory_limit=0) as cluster, Client(cluster) as c:
            a, b = sorted(c.scheduler_info()["workers"])
            x = c.submit(make, N, 3, workers=[a], pure=False)
            on_a = c.submit(probe, x, workers=[a], pure=False).result()
            assert on_a["where"].startswith("/memfd:") == (mode == "always")
            _meet(c, a, b)
            y = c.submit(make, N, 4, workers=[a], pure=False)
            on_a = c.submit(probe, y, workers=[a], pure=False).result()
            assert on_a["where"].startswith("/memfd:") == (mode == "always")
            on_b = c.submit(probe, y, workers=[b], pure=False).result()
            assert on_b["sum"] == expected(4)
            assert on_b["where"].startswith("/memfd:")  # shared at the fetch, if not before


async def amake(n: int, seed: int) -> np.ndarray:
    return make(n, seed)


def test_an_async_tasks_large_result_is_placed_too() -> None:
    with LocalCluster(2, 1, processes=True, memory_limit=0) as cluster, Client(cluster) as c:
        a, b = sorted(c.scheduler_info()["workers"])
        _meet(c, a, b)
        x = c.submit(amake, N, 7, workers=[a], pure=False)
        on_a = c.submit(probe, x, workers=[a], pure=False).result()
        token = token_of(on_a["where"])  # placed (in a thread) before the loop stored it
        assert on_a["sum"] == expected(7) and on_a["owned"] >= N
        on_b = c.submit(probe, x, workers=[b], pure=False).result()
        assert token_of(on_b["where"]) == token


def test_placing_stops_when_the_same_host_peers_are_gone() -> None:
    with LocalCluster(2, 1, processes=True, memory_limit=0) as cluster, Client(cluster) as c:
        a, b = sorted(c.scheduler_info()["workers"])
        _meet(c, a, b)
        x = c.submit(make, N, 8, workers=[a], pure=False)
        assert c.submit(probe, x, workers=[a], pure=False).result()["where"].startswith("/memfd:")
        pid_b = pid_of(c, b)
        os.kill(pid_b, signal.SIGKILL)
        eventually(lambda: not psutil.pid_exists(pid_b) or psutil.Process(pid_b).status()
                   == psutil.STATUS_ZOMBIE, "worker B gone", 30)  # fmt: skip
        y = c.submit(make, N, 9, workers=[a], pure=False)
        on_a = c.submit(probe, y, workers=[a], pure=False).result()
        assert on_a["sum"] == expected(9) and not on_a["where"].startswith("/memfd:")


@pytest.mark.parametrize("victim", ["producer", "consumer"])
def test_kill_9_with_a_placed_result_leaves_nothing_behind(victim: str) -> None:
    before = dev_shm()
    with LocalCluster(2, 1, processes=True, memory_limit=0) as cluster, Client(cluster) as c:
        a, b = sorted(c.scheduler_info()["workers"])
        _meet(c, a, b)
        x = c.submit(make, N, 5, workers=[a], pure=False)
        token = token_of(c.submit(probe, x, workers=[a], pure=False).result()["where"])
        on_b = c.submit(probe, x, workers=[b], pure=False).result()
        pid_a, pid_b = pid_of(c, a), pid_of(c, b)
        assert sorted(holders(token)) == sorted([pid_a, pid_b])
        dead, alive = (pid_a, pid_b) if victim == "producer" else (pid_b, pid_a)
        os.kill(dead, signal.SIGKILL)
        eventually(lambda: dead not in holders(token), "the dead holder dropped", 30)
        assert holders(token) == [alive]
        if victim == "producer":  # the consumer's copy outlives its producer
            eventually(lambda: a not in c.scheduler_info()["workers"], "the worker gone", 30)
            again = c.submit(probe, x, workers=[b], pure=False).result()
            assert again["sum"] == on_b["sum"] == expected(5)
        os.kill(alive, signal.SIGKILL)
        eventually(lambda: holders(token) == [], "no holder left", 30)
    assert dev_shm() <= before


def _spill(key: Any, dask_worker: Any) -> bool:
    return bool(dask_worker.store.spill(key)) and key in dask_worker.store.spilled


def test_a_placed_result_spills_and_comes_back_right() -> None:
    with LocalCluster(2, 1, processes=True, memory_limit=0) as cluster, Client(cluster) as c:
        a, b = sorted(c.scheduler_info()["workers"])
        _meet(c, a, b)
        x = c.submit(make, N, 6, workers=[a], pure=False)
        token = token_of(c.submit(probe, x, workers=[a], pure=False).result()["where"])
        assert c.run(_spill, x.key, workers=[a])[a] is True
        back = c.submit(probe, x, workers=[a], pure=False).result()
        assert back["sum"] == expected(6) and not back["where"].startswith("/memfd:")
        assert holders(token) in ([], [pid_of(c, a)])  # at most in A's pool of free segments
        on_b = c.submit(probe, x, workers=[b], pure=False).result()  # shared at the fetch
        assert on_b["sum"] == expected(6) and on_b["where"].startswith("/memfd:")


def full(n: int, value: int) -> np.ndarray:
    return np.full(n, value, dtype=np.uint8)


def pieces(n: int, count: int) -> list[np.ndarray]:
    """``count`` arrays of ``n`` bytes, each below the placing threshold (kept private)."""
    return [np.full(n, i, dtype=np.uint8) for i in range(count)]


def test_warm_segments_are_let_go_when_the_worker_is_above_its_memory_target() -> None:
    """Free segments kept for reuse are the worker's memory: above its target (60% of
    1 GiB here) it closes them, rather than spill values and keep the segments."""
    with LocalCluster(2, 1, processes=True, memory_limit="1GiB") as cluster, Client(cluster) as c:
        a, b = sorted(c.scheduler_info()["workers"])
        _meet(c, a, b)

        def free() -> int:
            return int(c.run(shm.free_bytes, workers=[a])[a])

        xs = [c.submit(full, 100 * MB, i, workers=[a], pure=False) for i in range(2)]
        assert [c.submit(len, x, workers=[a], pure=False).result() for x in xs] == [100 * MB] * 2
        del xs  # their segments go to A's pool of warm ones
        eventually(lambda: free() >= 200 * MB, "A keeps the two segments warm", 30)
        hog = c.submit(pieces, 15 * MB, 30, workers=[a], pure=False)  # 450 MB, private
        eventually(lambda: free() == 0, "A let the warm segments go", 60)
        assert c.submit(len, hog, workers=[a], pure=False).result() == 30


def test_a_bad_setting_is_refused_with_what_to_write() -> None:
    with dask.config.set({same_host.PLACE_KEY: "sometimes"}):
        with pytest.raises(ValueError, match="auto, always, never"):
            same_host.placement_settings()
    with dask.config.set({same_host.PLACE_KEY: False, same_host.THRESHOLD_KEY: "64 MiB"}):
        assert same_host.placement_settings() == ("never", 64 * MB)
    with dask.config.set({same_host.THRESHOLD_KEY: "lots"}):
        with pytest.raises(ValueError, match="16 MiB"):
            same_host.placement_settings()


@given(
    nbytes=st.integers(0, 1 << 40),
    mode=st.sampled_from(shm_policy.PLACE_MODES),
    peers=st.booleans(),
    segments=st.integers(0, 5000),
)
def test_policy_places_large_results_only_when_switched_on(
    nbytes: int, mode: str, peers: bool, segments: int
) -> None:
    placed = shm_policy.place_result(
        nbytes, mode=mode, threshold=16 * MB, same_host_peers=peers, segments=segments,
        max_segments=1000,
    )  # fmt: skip
    on = mode == "always" or (mode == "auto" and peers)
    assert placed == (on and nbytes >= 16 * MB and segments < 1000)


@given(
    memory=st.integers(0, 1 << 40),
    limit=st.integers(0, 1 << 40),
    target=st.one_of(st.none(), st.floats(0.1, 1.0)),
)
def test_free_segments_go_when_the_process_is_above_its_target(
    memory: int, limit: int, target: float | None
) -> None:
    release = shm_policy.release_free_segments(memory, limit, target)
    assert release == (limit > 0 and target is not None and memory > target * limit)


def test_a_result_larger_than_the_default_pool_finds_its_segment_warm() -> None:
    """A worker keeps an eighth of its memory limit of free segments warm (at least
    256 MiB), so a 260 MiB result reuses the segment of the one before it."""
    shm.release_segments()
    shm.keep_warm(shm_policy.warm_pool_bytes(4 << 30))  # a 4 GiB worker keeps 512 MiB
    n = 260 * MB
    first = shm.place(np.full(n, 1, dtype=np.uint8), threshold=16 * MB)
    token = shm.share(first)[0].parts[0][3]
    del first
    second = shm.place(np.full(n, 2, dtype=np.uint8), threshold=16 * MB)
    assert shm.share(second)[0].parts[0][3] == token  # the same segment, written again
    assert int(second[::4096].sum(dtype=np.uint64)) == 2 * len(range(0, n, 4096))
    del second
    shm.release_segments()
    assert token not in shm.segments_of(os.getpid())


@given(limit=st.integers(-1, 1 << 44))
def test_the_warm_pool_is_an_eighth_of_the_memory_limit(limit: int) -> None:
    kept = shm_policy.warm_pool_bytes(limit)
    assert kept >= shm_policy.WARM_POOL_BYTES
    assert kept == (max(shm_policy.WARM_POOL_BYTES, limit // 8) if limit > 0 else kept)
