"""Client methods that move data or workers, on real LocalClusters: ``retire_workers``,
``replicate``, ``rebalance``, the Active Memory Manager (``client.amm``),
``restart_workers``, ``shutdown``, and ``who_has`` of a collection.

Waiting for the cluster to settle polls with a deadline (no timed assertions).
"""

from __future__ import annotations

from typing import Any

import dask
import pytest

from polling import eventually
from trioscheduler import Client, LocalCluster
from trioscheduler.core.replication import plan_replicas

TIMEOUT = 60


def blob(i: int) -> bytes:
    return bytes(100_000 + i)


def inc(x: int) -> int:
    return x + 1



def copies(c: Client, fs: list[Any]) -> list[int]:
    return [len(v) for v in c.who_has(fs).values()]


def test_amm_follows_dask_config() -> None:
    """``distributed.scheduler.active-memory-manager``: ``start: false`` leaves it off
    until ``client.amm.start()``, which runs it every ``interval``."""
    config = {
        "distributed.scheduler.active-memory-manager.start": False,
        "distributed.scheduler.active-memory-manager.interval": "100ms",
    }
    with (
        dask.config.set(config),
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False) as cluster,
        Client(cluster) as c,
    ):
        c.wait_for_workers(2, timeout=TIMEOUT)
        assert not c.amm.running()
        fs = c.map(blob, range(3))
        c.gather(fs)
        c.replicate(fs)
        assert copies(c, fs) == [2, 2, 2]
        c.amm.start()
        assert c.amm.running()
        eventually(lambda: copies(c, fs) == [1, 1, 1], "one copy each, within a few ticks")


def test_replicate_amm_rebalance_and_retire() -> None:
    with (
        LocalCluster(n_workers=3, threads_per_worker=1, processes=True) as cluster,
        Client(cluster) as c,
    ):
        c.wait_for_workers(3, timeout=TIMEOUT)
        assert c.amm.running()  # on by default, as dask's
        c.amm.stop()
        assert not c.amm.running()
        a, b, _ = sorted(c.scheduler_info()["workers"])
        fs = c.map(blob, range(6), workers=[a])
        c.gather(fs)
        assert {len(keys) for w, keys in c.has_what().items() if w != a} == {0}

        # replicate: every worker gets a copy; n=0 and bad n are refused as in dask
        c.replicate(fs[:2])
        assert copies(c, fs[:2]) == [3, 3]
        c.replicate(fs[2:3], n=2)
        assert copies(c, fs[2:3]) == [2]
        with pytest.raises(ValueError, match="Can not use replicate to delete data"):
            c.replicate(fs, n=0)
        with pytest.raises(TypeError, match="integer"):
            c.replicate(fs, n="2")
        with pytest.raises(ValueError, match="unknown workers"):
            c.replicate(fs, workers=["tcp://127.0.0.1:1"])

        # the AMM's ReduceReplicas drops the extra copies, keeping one
        assert c.amm.run_once() == 5
        eventually(lambda: copies(c, fs[:3]) == [1, 1, 1], "one copy each")
        assert c.gather(fs[:3]) == [blob(0), blob(1), blob(2)]
        with pytest.raises(ValueError, match="unknown action"):
            c.sync(c.rpc, {"op": "amm", "action": "bogus"})

        # rebalance: keys piled on ``a`` move until the workers hold about as many bytes
        def spread() -> int:
            held = [w["nbytes"] for w in c.scheduler_info()["workers"].values()]
            return max(held) - min(held)

        gs = c.map(blob, range(10, 16), workers=[a])
        c.gather(gs)
        assert all(who == [a] for who in c.who_has(gs).values())
        before = spread()
        c.rebalance(gs)
        assert all(len(who) == 1 for who in c.who_has(gs).values())  # moved, not copied
        assert spread() < before and spread() <= 2 * len(blob(16)), (before, spread())
        assert c.gather(gs) == [blob(i) for i in range(10, 16)]
        fs = fs + gs

        # retire: the worker's data moves away first; nothing is lost or recomputed
        held_by_b = [f for f in fs if b in c.who_has([f])[f.key]]
        retired = c.retire_workers([b])
        assert list(retired) == [b] and retired[b]["nthreads"] == 1
        assert b not in c.scheduler_info()["workers"]
        assert all(b not in w for w in c.who_has(held_by_b).values())
        assert c.gather(fs) == [blob(i) for i in [*range(6), *range(10, 16)]]
        with pytest.raises(ValueError, match="unknown workers"):
            c.retire_workers(["tcp://127.0.0.1:1"])
        with pytest.raises(ValueError, match="close_workers"):
            c.retire_workers([a], close_workers=False)


def test_restart_workers_through_nannies_and_who_has_of_a_collection() -> None:
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster,
        Client(cluster) as c,
    ):
        c.wait_for_workers(2, timeout=TIMEOUT)
        x = c.persist(dask.delayed(inc)(1))
        assert c.compute(x).result(timeout=TIMEOUT) == 2
        [key] = c.who_has(x)  # a collection holding futures, as dask accepts
        assert key == x.key
        a, b = sorted(c.scheduler_info()["workers"])
        name_of_a = c.scheduler_info()["workers"][a]["name"]
        got = c.restart_workers([name_of_a])
        assert got == {name_of_a: "OK"}  # keyed as given
        workers = c.scheduler_info()["workers"]
        assert a not in workers and b in workers and len(workers) == 2
        assert c.submit(inc, 10, pure=False).result(timeout=TIMEOUT) == 11
        with pytest.raises(ValueError, match="unknown workers"):
            c.restart_workers(["tcp://127.0.0.1:1"])
        with pytest.raises(ValueError, match="needs the workers"):
            c.restart_workers([])


def test_restart_workers_needs_a_nanny_and_shutdown_closes_the_cluster() -> None:
    cluster = LocalCluster(n_workers=1, processes=False)
    c = Client(cluster)
    try:
        [w] = c.scheduler_info()["workers"]
        with pytest.raises(ValueError, match="nanny"):
            c.restart_workers([w])
        c.shutdown()
        assert c.status == "closed" and cluster.status == "closed"
    finally:
        c.close()
        cluster.close()


def test_shutdown_by_address_closes_the_workers() -> None:
    with LocalCluster(n_workers=2, processes=False) as cluster:
        c = Client(cluster.scheduler_address, set_as_default=False)
        c.wait_for_workers(2, timeout=TIMEOUT)
        c.shutdown()
        assert c.status == "closed"
        eventually(lambda: not cluster.workers, "the workers to close")


def test_plan_replicas_spreads_copies_deterministically() -> None:
    plan = plan_replicas({"x": ["w1"], "y": ["w1", "w2"]}, ["w1", "w2", "w3"], 3)
    assert plan == {"w2": ["x"], "w3": ["x", "y"]}
    assert plan_replicas({"x": ["w1"]}, ["w1", "w2"], 1) == {}
    with pytest.raises(ValueError, match="at least 1"):
        plan_replicas({"x": ["w1"]}, ["w1"], 0)
