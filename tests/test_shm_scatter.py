"""``scatter`` from a client on the workers' host hands large buffers over through
shared memory (``wire.shm.hand_off``), with real worker processes.

What a user notices: the scattered values are right and keyed as dask keys them; the
worker's array is a mapping of a segment the client filled (no copy through the socket),
counted once, as the worker's memory; the client keeps no segment; nothing is left in
``/dev/shm`` or in any process after the value is released, or after ``kill -9`` of the
worker or of the client; a worker that cannot map the client's segments gets the values
through the socket (from that client only: another client in the process still tries).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from dask.base import tokenize

from polling import eventually
from test_shm import MB, dev_shm, holders, make, pid_of, probe, token_of
from trioscheduler.client.client import Client
from trioscheduler.deploy.cluster import LocalCluster
from trioscheduler.wire import shm

pytestmark = pytest.mark.skipif(shm.HOST_ID is None, reason="no memfd on this system")


def owned() -> tuple[int, set[str]]:
    return shm.owned_bytes(), shm.segments_of(os.getpid())


def test_scatter_hands_a_large_array_to_a_worker_through_shared_memory() -> None:
    before = dev_shm()
    n = 16 * MB
    a = make(n, 1)
    with LocalCluster(1, 1, processes=True, memory_limit=0) as cluster, Client(cluster) as c:
        (w,) = c.scheduler_info()["workers"]
        f = c.scatter(a)
        assert f.key == f"ndarray-{tokenize(a)}"  # dask's key for the same array
        on_w = c.submit(probe, f, pure=False).result()
        assert on_w["sum"] == int(a.sum(dtype=np.uint64))
        token = token_of(on_w["where"])  # the worker's array is the mapped segment
        assert holders(token) == [pid_of(c, w)]  # the client let its descriptor go
        assert on_w["owned"] >= n and on_w["counted"] >= n  # counted once, by the worker
        assert owned() == (0, set())  # and not by the client
        g = c.submit(np.add, f, 1, pure=False)  # tasks read it like any array
        assert np.array_equal(g.result(), a + 1)
        del f, g
        eventually(lambda: holders(token) == [], "the released value's segment gone", 30)
        assert c.run(owned)[w] == (0, set())
    assert dev_shm() <= before


def test_scatter_of_many_values_keeps_small_ones_on_the_socket() -> None:
    big, small = make(4 * MB, 2), make(1000, 3)
    with LocalCluster(2, 1, processes=True, memory_limit=0) as cluster, Client(cluster) as c:
        workers = sorted(c.scheduler_info()["workers"])
        fs = c.scatter({"big": big, "small": small, "text": "hello"}, broadcast=True)
        for w in workers:
            on_w = c.submit(probe, fs["big"], workers=[w], pure=False).result()
            assert on_w["sum"] == int(big.sum(dtype=np.uint64)) and on_w["owned"] >= 4 * MB
            token_of(on_w["where"])  # each worker maps its own segment
            small_w = c.submit(probe, fs["small"], workers=[w], pure=False).result()
            assert not small_w["where"].startswith("/memfd:")
        assert c.gather(fs["text"]) == "hello"
        assert np.array_equal(c.gather(fs["big"]), big) and owned() == (0, set())
        xs = c.scatter([make(2 * MB, s) for s in range(4)])  # a list, over both workers
        assert [int(x.sum(dtype=np.uint64)) for x in c.gather(xs)] == [
            int(make(2 * MB, s).sum(dtype=np.uint64)) for s in range(4)
        ]


def about_bytes(b: bytes) -> tuple[str, int, str, int]:
    import hashlib

    return type(b).__name__, len(b), hashlib.sha1(b).hexdigest(), shm.owned_bytes()


def test_scatter_of_large_bytes_keys_by_contents_and_gives_bytes() -> None:
    small = b"abc" * 1000
    big = make(3 * MB, 7).tobytes()
    with LocalCluster(1, 1, processes=True, memory_limit=0) as cluster, Client(cluster) as c:
        f, g = c.scatter([big, small])
        assert f.key == f"bytes-{hashlib.sha1(big).hexdigest()}"  # not dask's tokenize
        assert g.key == f"bytes-{tokenize(small)}"  # small bytes: dask's key
        assert c.scatter(big).key == f.key  # the same contents, the same key
        kind, n, digest, _ = c.submit(about_bytes, f, pure=False).result()
        assert (kind, n, digest) == ("bytes", len(big), hashlib.sha1(big).hexdigest())
        assert c.gather(g) == small and owned() == (0, set())
        objects = np.array([str(i) for i in range(200_000)], dtype=object)  # hashed here
        h = c.scatter(objects)
        assert h.key == f"ndarray-{tokenize(objects)}"
        assert c.submit(len, h, pure=False).result() == len(objects)


async def test_in_process_workers_get_scattered_values_themselves() -> None:
    from trioscheduler.deploy.cluster import open_cluster

    big, array = make(2 * MB, 8).tobytes(), make(2 * MB, 9)
    async with open_cluster(1, 1, processes=False, memory_limit=0) as cluster:
        async with Client(cluster, asynchronous=True) as c:
            f, g = await c.scatter([big, array])
            assert await c.submit(about_bytes, f, pure=False) == (
                "bytes", len(big), hashlib.sha1(big).hexdigest(), 0,
            )  # fmt: skip
            on_w = await c.submit(probe, g, pure=False)
            assert not on_w["where"].startswith("/memfd:") and on_w["sum"] == int(
                array.sum(dtype=np.uint64)
            )


def _client_process(address: str) -> None:
    """A client in its own process: scatters an array, says so, and waits to be killed."""
    with Client(address) as c:
        f = c.scatter(make(8 * MB, 4))
        print(f.key, flush=True)
        sys.stdin.read()


@pytest.mark.parametrize("victim", ["worker", "client"])
def test_kill_9_leaves_nothing_behind(victim: str) -> None:
    before = dev_shm()
    with LocalCluster(1, 1, processes=True, memory_limit=0) as cluster, Client(cluster) as c:
        (w,) = c.scheduler_info()["workers"]
        pid_w = pid_of(c, w)
        code = (
            "import sys; sys.path[:0] = sys.argv[2:]; import test_shm_scatter as t; "
            "t._client_process(sys.argv[1])"
        )
        path = [os.path.dirname(__file__), *sys.path]
        other = subprocess.Popen(
            [sys.executable, "-c", code, cluster.scheduler_address, *path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert other.stdout is not None
            key = other.stdout.readline().strip()
            assert key.startswith("ndarray-")
            (token,) = c.run(owned)[w][1]  # the worker holds the handed-over segment
            assert holders(token) == [pid_w]
            os.kill(pid_w if victim == "worker" else other.pid, signal.SIGKILL)
            # a killed client: the scheduler releases its data, the worker drops it
            eventually(lambda: holders(token) == [], "no holder left", 30)
        finally:
            other.kill()
            other.wait(30)
    assert dev_shm() <= before


def _handed_segments_cannot_be_mapped() -> None:
    """What a host that forbids opening another process's descriptors does (the
    worker's own ``attach`` is made to fail that way)."""

    def refuse(ref: Any, adopt: bool = False) -> Any:
        raise shm.SharedMemoryError("opening /proc/<pid>/fd: permission denied")

    vars(shm).setdefault("_attach_before_refuse", shm.attach)
    shm.attach = refuse


def _handed_segments_can_be_mapped_again() -> None:
    shm.attach = vars(shm)["_attach_before_refuse"]


def test_a_worker_that_cannot_map_gets_the_values_through_the_socket() -> None:
    n = 4 * MB
    with LocalCluster(1, 1, processes=True, memory_limit=0) as cluster, Client(cluster) as c:
        (w,) = c.scheduler_info()["workers"]
        c.run(_handed_segments_cannot_be_mapped)
        for seed in (5, 6):  # the second without a failure first
            f = c.scatter(make(n, seed))
            on_w = c.submit(probe, f, pure=False).result()
            assert on_w["sum"] == int(make(n, seed).sum(dtype=np.uint64))
            assert not on_w["where"].startswith("/memfd:") and on_w["owned"] == 0
            assert w in c.no_shm_workers
        big = make(n, 7).tobytes()
        about = c.submit(about_bytes, c.scatter(big), pure=False).result()
        assert about == ("bytes", n, hashlib.sha1(big).hexdigest(), 0)
        assert owned() == (0, set())


def test_a_workers_refusal_of_shared_memory_is_remembered_per_client() -> None:
    """One client's hand-off that a worker could not map sends that client's later
    scatters to it through the socket, not another client's in the same process: once
    the worker can map again, the other client hands its values over in shared memory."""
    n = 4 * MB
    with (
        LocalCluster(1, 1, processes=True, memory_limit=0) as cluster,
        Client(cluster) as a,
        Client(cluster) as b,
    ):
        (w,) = a.scheduler_info()["workers"]
        a.run(_handed_segments_cannot_be_mapped)
        on_w = a.submit(probe, a.scatter(make(n, 10)), pure=False).result()
        assert not on_w["where"].startswith("/memfd:")  # refused: sent again by socket
        a.run(_handed_segments_can_be_mapped_again)
        on_w = b.submit(probe, b.scatter(make(n, 11)), pure=False).result()
        token_of(on_w["where"])  # b's value is a mapped segment
        assert on_w["sum"] == int(make(n, 11).sum(dtype=np.uint64))
        on_w = a.submit(probe, a.scatter(make(n, 12)), pure=False).result()
        assert not on_w["where"].startswith("/memfd:")  # a still sends it by socket
        assert on_w["sum"] == int(make(n, 12).sum(dtype=np.uint64))
        assert w in a.no_shm_workers and w not in b.no_shm_workers
