"""What logging an event costs against handling it (issue 18), for callgrind.

    python -m benchmarks.recovery_cost make LOG      # a real 8,192-leaf tree's log
    valgrind --tool=callgrind python -m benchmarks.recovery_cost none LOG
    valgrind --tool=callgrind python -m benchmarks.recovery_cost replay LOG
    valgrind --tool=callgrind python -m benchmarks.recovery_cost record LOG
    python -m benchmarks.recovery_cost parts LOG     # timed: dump, pack, crc32, write

``none`` reads the log and loads its events; ``replay`` also hands them to a fresh
``SchedulerState`` (the core's cost); ``record`` writes them again through
``EventLogWriter.record``, one frame per ``handle()`` call (the log's cost). Subtract
``none`` from the other two. No ratio against dask: dask has no such log.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

import msgpack

from trioscheduler.core import messages as m
from trioscheduler.core.recorder import batches, header, split_log
from trioscheduler.core.scheduler import SchedulerState
from trioscheduler.server.event_log import EventLogWriter, read_log


def inc(x: int) -> int:
    return x + 1


def add(a: int, b: int) -> int:
    return a + b


def make(path: Path, leaves: int = 8_192) -> None:
    from dask import delayed

    from trioscheduler import Client, LocalCluster

    path.unlink(missing_ok=True)
    kw = {"recover_from": path}
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None, scheduler_kwargs=kw) as cl,
        Client(cl) as c,
    ):
        layer = [delayed(inc)(i) for i in range(leaves)]
        while len(layer) > 1:
            layer = [delayed(add)(layer[i], layer[i + 1]) for i in range(0, len(layer), 2)]
        assert c.compute(layer[0]).result() == leaves * (leaves + 1) // 2


def main(mode: str, path: Path) -> None:
    if mode == "make":
        make(path)
        return
    contents = read_log(path)
    _, settings, records = split_log(contents.records)
    groups = [[m.load(r) for r in g] for g in batches(records)]
    n = sum(len(g) for g in groups)
    if mode == "replay":
        state = SchedulerState(**settings)
        for g in groups:
            state.handle(*g)
    elif mode == "record":
        with tempfile.TemporaryDirectory() as tmp:
            w = EventLogWriter.create(Path(tmp) / "log", header("scheduler", {}), None)
            for g in groups:
                w.record(g)
            w.close()
    elif mode == "parts":
        t = time.process_time()
        dumped = [[m.dump(e) for e in g] for g in groups]
        dump = time.process_time() - t
        packer = msgpack.Packer(use_bin_type=True)
        t = time.process_time()
        payloads = [b"".join([packer.pack(r) for r in g]) for g in dumped]
        pack = time.process_time() - t
        t = time.process_time()
        for p in payloads:
            zlib.crc32(p)
        crc = time.process_time() - t
        with tempfile.TemporaryDirectory() as tmp:
            fd = os.open(Path(tmp) / "w", os.O_WRONLY | os.O_CREAT)
            t = time.process_time()
            for p in payloads:
                os.write(fd, p)
            write = time.process_time() - t
            os.close(fd)
        state = SchedulerState(**settings)
        t = time.process_time()
        for g in groups:
            state.handle(*g)
        core = time.process_time() - t
        us = 1e6 / n
        print(f"µs per event: core {core * us:.1f}, dump {dump * us:.1f}, pack {pack * us:.1f}, "
              f"crc32 {crc * us:.2f}, write {write * us:.1f}")  # fmt: skip
    print(f"{n} events in {len(groups)} handle() calls, {contents.good_bytes:,} bytes")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
