"""One cold and one cached ``restart(environment=...)``, with the CPU they cost.

``python -m benchmarks._env_child ARCHIVE [CACHE_PARENT]``: a fresh 2-nanny
``LocalCluster`` (spawned workers) uploads ARCHIVE (a ``pack-env`` tar.gz), restarts
into it with an empty host cache, runs a task there, goes back to the base environment
and restarts into the environment again (cached). Prints wall times and the user+system
CPU of every process involved (this one, the workers, the preflights), which says more
than wall time on a loaded machine. The host cache is left behind in CACHE_PARENT, not
deleted (deleting 9,000 files slows the next extraction on this machine's ext4).

To compare two builds, run it alternately against each build's source tree (for
example ``git archive REV src | tar x -C /tmp/rev`` and ``PYTHONPATH=/tmp/rev/src``),
each with an archive packed by that build's ``pack-env``.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import cloudpickle
import psutil

# The workers inside the environment cannot import this module: send its functions.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _prefix() -> str:
    return sys.prefix


def cpu_seconds() -> float:
    """User+system CPU of this process, its reaped children and its live descendants."""
    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return float(total)


def main(archive: Path, cache_parent: str | None) -> None:
    from trioscheduler import Client, LocalCluster

    cache = tempfile.mkdtemp(prefix="trioscheduler-env-child-", dir=cache_parent)
    with (
        LocalCluster(2, 1, memory_limit=0, start_method="spawn", env_cache_dir=cache) as cluster,
        Client(cluster) as client,
    ):
        client.submit(_prefix, pure=False).result()
        t0, c0 = time.perf_counter(), cpu_seconds()
        env_id = client.upload_environment(str(archive))
        t1 = time.perf_counter()
        client.restart(environment=env_id, timeout=900)
        t2 = time.perf_counter()
        prefix = client.submit(_prefix, pure=False).result()
        t3 = time.perf_counter()
        assert prefix.startswith(cache), prefix
        print(
            f"cold: upload {t1 - t0:.2f} s, restart {t2 - t1:.2f} s, first task "
            f"{t3 - t2:.2f} s, total {t3 - t0:.2f} s, cpu {cpu_seconds() - c0:.2f} s",
            flush=True,
        )
        client.restart(environment="base", timeout=900)
        t4 = time.perf_counter()
        client.restart(environment=env_id, timeout=900)
        client.submit(_prefix, pure=False).result()
        print(f"cached: {time.perf_counter() - t4:.2f} s to the first task", flush=True)
    print(f"host cache left in {cache}", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f %(name)s %(message)s")
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else os.environ.get("CACHE_PARENT"))
