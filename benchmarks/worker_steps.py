"""The worker's side of a lone round trip, step by step: read ``ComputeTask`` -> write
``TaskFinished``.

``python -m benchmarks.worker_steps N``: a ``LocalCluster(2, 1, processes=True)`` (the
scheduler in this process), a warm-up, then ``N`` calls of
``submit(step_inc, i, pure=False).result()`` while the worker notes the time
(``time.perf_counter_ns``) at each step of the path ``round_trip_hops`` shows as
``w_read`` -> ``t_start`` -> ``t_end`` -> ``w_write``, for a task run on the worker's loop
(``server.quick_tasks``):

- ``read``: the message is read off the socket; ``loaded``: decoded (``receive_batch``)
- ``handle``: ``Worker.handle`` entered; ``core`` / ``core_out``: the core's ``handle``
  called / returned (through a proxy of the core: the compiled class is not patched)
- ``execute``: ``Worker._execute``; ``submit``: ``ThreadExecutor.submit`` (parks the job)
- ``run_parked``, ``run_job``; ``unpack`` / ``unpacked``: the run spec loaded
- ``t_start`` / ``t_end``: the task function starts / ends; ``job_done``: ``run_job`` returned
- ``finished``: ``Worker._finished``; ``finish``: ``Worker._finish``; ``handle2``,
  ``core2``, ``core_out2``: the handling of ``ExecuteSuccess``
- ``flush``: ``BatchedSend.flush_nowait``; ``dumps`` / ``dumped``: ``dumps_batch``;
  ``write``: just before ``sendmsg``

Each hook is a wrapper of a shell function (~0.3 us each, ~20 of them: the total is
~10 us more than without). Prints one JSON line: per step, the median microseconds since
the step before it, the median read -> write, and the p50 round trip.

``python -m benchmarks.worker_steps --ab ROUNDS N NAME=PYTHONPATH ...``: alternated
builds, as ``round_trip_hops --ab``.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time
from typing import Any

from benchmarks import round_trip_hops as hops
from benchmarks._harness import step_tool

_REC: list[tuple[str, int]] = []  # per process: (step, perf_counter_ns)
_ns = time.perf_counter_ns
# round_trip_hops's hooks, noting into this module's records
_before = functools.partial(hops._before, rec=_REC)
_around = functools.partial(hops._around, rec=_REC)
_after_async = functools.partial(hops._after_async, rec=_REC)

STEPS = [
    "read", "loaded", "handle", "core", "core_out", "execute", "submit", "run_parked",
    "run_job", "unpack", "unpacked", "t_start", "t_end", "job_done", "finished", "finish",
    "handle2", "core2", "core_out2", "flush", "dumps", "dumped", "write",
]  # fmt: skip
_SECOND = {"handle": "handle2", "core": "core2", "core_out": "core_out2"}  # after t_end


def step_inc(x: int) -> int:
    """``inc`` that notes when it starts and ends."""
    _REC.append(("t_start", _ns()))
    y = x + 1
    _REC.append(("t_end", _ns()))
    return y


class _Core:
    """The worker's core seen through a proxy that notes when ``handle`` runs."""

    def __init__(self, state: Any) -> None:
        object.__setattr__(self, "_state", state)

    def handle(self, *events: Any) -> Any:
        _REC.append(("core", _ns()))
        out = self._state.handle(*events)
        _REC.append(("core_out", _ns()))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._state, name, value)


def install() -> None:
    """(In a worker's loop: ``client.run``.) Hook the worker's steps."""
    from trioscheduler.server import executor
    from trioscheduler.server.executor import ThreadExecutor
    from trioscheduler.server.worker import Worker
    from trioscheduler.wire import runspec, tcp
    from trioscheduler.wire.batched import BatchedSend
    from trioscheduler.wire.tcp import TCPStream

    TCPStream._read_message = _after_async("read", TCPStream._read_message)  # type: ignore[method-assign]
    TCPStream.receive_batch = _after_async("loaded", TCPStream.receive_batch)  # type: ignore[method-assign]
    handle = Worker.handle

    def proxied(self: Any, *events: Any) -> None:
        _REC.append(("handle", _ns()))
        if self.state is not None and not isinstance(self.state, _Core):
            self.state = _Core(self.state)
        handle(self, *events)

    Worker.handle = proxied  # type: ignore[method-assign]
    Worker._execute = _before("execute", Worker._execute)  # type: ignore[method-assign]
    ThreadExecutor.submit = _before("submit", ThreadExecutor.submit)  # type: ignore[method-assign]
    ThreadExecutor.run_parked = _before("run_parked", ThreadExecutor.run_parked)  # type: ignore[method-assign]
    executor.run_job = _around("run_job", "job_done", executor.run_job)
    for name in ("unpack", "unpack_alone"):
        if hasattr(runspec, name):
            setattr(runspec, name, _around("unpack", "unpacked", getattr(runspec, name)))
    Worker._finished = _before("finished", Worker._finished)  # type: ignore[method-assign]
    Worker._finish = _before("finish", Worker._finish)  # type: ignore[method-assign]
    BatchedSend.flush_nowait = _before("flush", BatchedSend.flush_nowait)  # type: ignore[method-assign]
    tcp.dumps_batch = _around("dumps", "dumped", tcp.dumps_batch)  # type: ignore[attr-defined]
    TCPStream._send_now = _before("write", TCPStream._send_now)  # type: ignore[method-assign]


def take_records() -> list[tuple[str, int]]:
    out = list(_REC)
    _REC.clear()
    return out


def rows(records: list[tuple[str, int]]) -> list[dict[str, int]]:
    """One ``{step: time}`` per read that started a task and ended in a write (the steps
    of a later read start a new row; the first of each step after the read counts)."""
    records = sorted(records, key=lambda r: r[1])
    out: list[dict[str, int]] = []
    row: dict[str, int] | None = None
    for name, t in records:
        if name == "read":
            row = {"read": t}
        elif row is None:
            continue
        elif name == "write":
            if "t_start" in row:
                row["write"] = t
                out.append(row)
            row = None
        else:
            if "t_end" in row:
                name = _SECOND.get(name, name)
            row.setdefault(name, t)
    return out


def summary(found: list[dict[str, int]]) -> dict[str, float]:
    """Per step, the median microseconds since the step before it (in ``STEPS`` order,
    of those the row has)."""
    out: dict[str, float] = {}
    for k, name in enumerate(STEPS[1:], 1):
        gaps = []
        for row in found:
            if name not in row:
                continue
            prev = next((p for p in reversed(STEPS[:k]) if p in row), None)
            if prev is not None:
                gaps.append((row[name] - row[prev]) / 1e3)
        if gaps:
            out[name] = round(statistics.median(gaps), 1)
    if found:
        out["read_to_write"] = round(statistics.median((r["write"] - r["read"]) / 1e3 for r in found), 1)
    return out


def sample(n: int) -> dict[str, Any]:
    import trioscheduler

    kw = {"n_workers": 2, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    with trioscheduler.LocalCluster(**kw) as cluster, trioscheduler.Client(cluster) as client:
        for i in range(300):
            client.submit(step_inc, i, pure=False).result()
        client.run(install)
        for i in range(50):
            client.submit(step_inc, i, pure=False).result()
        client.run(take_records)
        lat = []
        for i in range(n):
            t = _ns()
            client.submit(step_inc, i, pure=False).result()
            lat.append(_ns() - t)
        records = [r for rs in client.run(take_records).values() for r in rs]
    found = rows(records)
    out: dict[str, Any] = summary(found)
    out["complete"] = len(found) / n
    out["p50_ms"] = statistics.median(lat) / 1e6
    out["load"] = os.getloadavg()[0]
    return out


def main(argv: list[str]) -> None:
    step_tool("benchmarks.worker_steps", sample, "read_to_write", argv)


if __name__ == "__main__":
    # by its module name, so that the functions sent to the workers are pickled by
    # reference and share that module's _REC in each process
    from benchmarks import worker_steps

    worker_steps.main(sys.argv[1:])
