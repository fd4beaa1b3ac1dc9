"""``restart(environment=...)`` on real nannies and worker processes.

The cluster ships a real venv (``envkit``), every worker restarts inside it, and the
scheduler's memory of the current environment carries over to a worker restarted after
a crash and to a worker that joins later; a refused environment stops no worker.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import trio

import envkit
from polling import wait_until
from trioscheduler.client.client import Client
from trioscheduler.deploy.cluster import open_cluster
from trioscheduler.environments import EnvironmentRefusedError, archive
from trioscheduler.server.nanny import Nanny

TIMEOUT = 120

# Workers inside a shipped environment cannot import this test module: send its
# functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def where() -> tuple[str, str, str | None, int]:
    """``(sys.prefix, sys.executable, marker.VERSION or None, pid)`` of a worker."""
    try:
        import marker  # type: ignore[import-not-found]

        version: str | None = marker.VERSION
    except ImportError:
        version = None
    return sys.prefix, sys.executable, version, os.getpid()


def marker_version() -> str:
    import marker

    return str(marker.VERSION)


def file_digest(relative: str) -> str:
    with open(os.path.join(sys.prefix, relative), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return envkit.shippable_venv(tmp_path_factory.mktemp("build") / "venv")



async def test_workers_restart_into_the_environment_and_stay_there(
    shipped: Path, tmp_path: Path
) -> None:
    cache_root = tmp_path / "cache"
    with trio.fail_after(TIMEOUT):
        async with open_cluster(
            2, 1, memory_limit=0, start_method="spawn", env_cache_dir=str(cache_root)
        ) as cluster:
            async with Client(cluster, asynchronous=True) as c:
                before = await c.run(where)
                assert all(v[2] is None for v in before.values())  # marker is nowhere yet
                base_prefix = next(iter(before.values()))[0]

                # Both nannies prepare at once: one directory in the host cache.
                await c.restart(environment=str(shipped))
                env_id = archive.pack(shipped, tmp_path / "same.tar.gz")  # deterministic
                prefix = str(cache_root / env_id / "env")
                assert sorted(p.name for p in cache_root.iterdir() if p.is_dir()) == [env_id]

                async def all_inside(n: int) -> dict[str, Any]:
                    info = await c.run(where)
                    assert len(info) == n
                    for p, exe, version, _ in info.values():
                        assert p == prefix and exe.startswith(prefix + "/")
                        assert version == envkit.MARKER_VERSION
                    return info

                info = await all_inside(2)
                assert await c.submit(marker_version, pure=False) == envkit.MARKER_VERSION

                # A crash: the nanny restarts the worker in the same environment.
                victim = cluster.workers["0"]
                assert isinstance(victim, Nanny) and victim.pid in {v[3] for v in info.values()}
                old_pid, old_address, restarts = victim.pid, victim.worker_address, victim.restarts
                os.kill(old_pid, signal.SIGKILL)
                workers = cluster.scheduler.state.workers  # type: ignore[union-attr]
                await wait_until(
                    lambda: (
                        victim.restarts == restarts + 1
                        and victim.worker_address != old_address
                        and victim.worker_address in workers
                        and old_address not in workers
                    )
                )
                info = await all_inside(2)
                assert old_pid not in {v[3] for v in info.values()}

                # A worker that joins later starts in the current environment too.
                await cluster.scale(3)
                await c.wait_for_workers(3)
                await all_inside(3)

                await c.restart()  # no environment: stay where we are
                await all_inside(3)

                await c.restart(environment="base")
                back = await c.run(where)
                assert len(back) == 3
                assert {(v[0], v[2]) for v in back.values()} == {(base_prefix, None)}
                # nothing left half-made in the cache
                assert sorted(p.name for p in cache_root.iterdir() if p.is_dir()) == [env_id]


async def test_refused_environments_stop_no_worker(
    shipped: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = tmp_path / "good.tar.gz"
    archive.pack(shipped, good)
    incompatible = envkit.rewrite_archive(good, tmp_path / "py399.tar.gz", python="3.99")
    no_trio = envkit.make_venv(tmp_path / "no-trio", overlay=None)
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    with trio.fail_after(TIMEOUT):
        async with open_cluster(
            1, 1, memory_limit=0, start_method="spawn", env_cache_dir=str(tmp_path / "cache")
        ) as cluster:
            async with Client(cluster, asynchronous=True) as c:
                before = await c.run(where)
                [worker] = before

                with pytest.raises(EnvironmentRefusedError) as info:
                    await c.restart(environment=str(incompatible))
                assert f"python: env '3.99' vs host '{here}'" in str(info.value)
                assert list(info.value.reasons) == [worker]

                with pytest.raises(EnvironmentRefusedError, match="lacks the module 'trio'"):
                    await c.restart(environment=str(no_trio))

                # The archive rots on the scheduler's disk: the nanny's sha256 check
                # refuses what arrives.
                env_id = await c.upload_environment(str(good))
                # The first phase has its own budget: used up, the restart is refused
                # (nanny side) or never asked for (upload side), before any worker stops.
                with pytest.raises(EnvironmentRefusedError, match="prepare_timeout"):
                    await c.restart(environment=env_id, prepare_timeout=0)
                with pytest.raises(TimeoutError, match="uploading the environment took longer"):
                    await c.restart(environment=str(good), prepare_timeout=0)
                stored = cluster.scheduler.environments.path(env_id)  # type: ignore[union-attr]
                data = bytearray(stored.read_bytes())
                # 4 KiB of garbage: the inflater chokes before the end, and the error
                # must still name the sha256, the cause, not zlib's complaint.
                middle = len(data) // 2
                data[middle : middle + 4096] = bytes(range(256)) * 16
                stored.write_bytes(bytes(data))
                with pytest.raises(EnvironmentRefusedError, match="sha256"):
                    await c.restart(environment=env_id)

                with pytest.raises(EnvironmentRefusedError, match="no environment"):
                    await c.restart(environment="0" * 64)

                # The same worker process, still in the base environment, still working.
                assert await c.run(where) == before
                assert cluster.scheduler.environments.current is None  # type: ignore[union-attr]
                assert await c.submit(sum, [1, 2], pure=False) == 3


async def test_shim_and_a_big_file_arrive_intact_over_tls(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An environment without trioscheduler (only its dependencies) runs with the nanny's
    trioscheduler, with a warning; a 20 MB file (several chunks) arrives intact, over
    the TLS connections of a cluster with certificates."""
    pytest.importorskip("cryptography")
    from trioscheduler import Security

    env = envkit.make_venv(tmp_path / "deps-only", overlay="plain")
    (envkit.site_packages(env) / "marker.py").write_text("VERSION = 'shim-1'\n")
    blob = os.urandom(20 * 2**20)
    (env / "share").mkdir()
    (env / "share" / "blob.bin").write_bytes(blob)
    caplog.set_level(logging.WARNING, logger="trioscheduler.environments")
    with trio.fail_after(TIMEOUT):
        async with open_cluster(
            1,
            1,
            memory_limit=0,
            start_method="spawn",
            env_cache_dir=str(tmp_path / "cache"),
            security=Security.temporary(),
        ) as cluster:
            assert cluster.scheduler_address.startswith("tls://")
            async with Client(cluster, asynchronous=True) as c:
                env_id = await c.upload_environment(str(env))
                assert cluster.scheduler.environments.path(env_id).stat().st_size > 2 * 8 * 2**20  # type: ignore[union-attr]
                await c.restart(environment=env_id)
                assert "has no trioscheduler" in caplog.text
                [(prefix, _, version, _)] = (await c.run(where)).values()
                assert prefix == str(tmp_path / "cache" / env_id / "env")
                assert version == "shim-1"
                digest = await c.submit(file_digest, "share/blob.bin", pure=False)
                assert digest == hashlib.sha256(blob).hexdigest()
