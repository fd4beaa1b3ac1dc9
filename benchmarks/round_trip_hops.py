"""Where a lone ``submit(...).result()`` round trip spends its wall time, hop by hop.

``python -m benchmarks.round_trip_hops N``: a ``LocalCluster(2, 1, processes=True)``
(the scheduler in this process), a warm-up, then ``N`` calls of
``submit(hop_inc, i, pure=False).result()`` while each process notes the time
(``time.perf_counter_ns``: ``CLOCK_MONOTONIC``, one clock for all processes on Linux)
of each hop of the round trip:

- ``submit``: the user thread calls ``submit``; ``posted``: it returns (before ``result()``)
- ``c_wake``: the client process's loop wakes from its I/O wait (trio ``Instrument``)
- ``emit``: the loop runs the posted graph (``Client._emit_graph``)
- ``c_write``: the scheduler writes to the worker (just before ``sendmsg``: the waker
  may be preempted by the process it wakes, on the same core, until that one sleeps)
- ``w_wake``: the worker's loop wakes; ``w_read``: it has read the message
- ``queue``: the job goes to the task thread (``ThreadExecutor._queue``)
- ``t_start`` / ``t_end``: the task function starts / ends, in the task thread
- ``deliver``: the task thread hands the result to the loop (``run_sync_soon``)
- ``w_wake2``: the worker's loop wakes; ``w_take``: it takes the finished task
  (``queue``, ``deliver``, ``w_wake2`` and ``w_take`` are 0 for a task the worker ran on
  its loop, ``server.quick_tasks``; a wake-up is 0 if the loop was awake already)
- ``w_write``: the worker writes ``TaskFinished``
- ``c_wake2``: the client process's loop wakes; ``c_read``: the scheduler has read it
- ``settle``: the future is set (``KeyState._settle``); ``woken``: ``result()`` returns
- ``released``: the future is dropped (its release posted to the loop), as in
  ``submit(...).result()``: the round trip ends here

The hooks are wrappers of shell functions (never of the compiled core), installed in
each process; each adds ~0.3 us. Prints one JSON line: per hop, the median and p90 of
the time since the previous hop, in microseconds, and the p50 round trip. A hop whose
time is spent waiting (a wake-up, a thread hand-off) shows as a gap much larger than the
CPU the steps around it take (``benchmarks.round_trip_steps``).

``python -m benchmarks.round_trip_hops --ab ROUNDS N NAME=PYTHONPATH ...``: alternated
builds, as ``round_trip_steps --ab``.
"""

from __future__ import annotations

import bisect
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import trio

from benchmarks._harness import step_tool

_REC: list[tuple[str, int]] = []  # per process: (hop, perf_counter_ns)
_ns = time.perf_counter_ns

HOPS = [
    "submit", "c_wake", "emit", "c_write", "w_wake", "w_read", "queue", "t_start",
    "t_end", "deliver", "w_wake2", "w_take", "w_write", "c_wake2", "c_read", "settle",
    "woken", "released",
]  # fmt: skip
# the recorded name of each hop (a wake-up and a write are recorded alike each time)
_RECORDED = {"c_wake2": "c_wake", "w_wake2": "w_wake"}
# hops that may not happen: a wake-up of a loop that was awake; the hand-off to a task
# thread and back, for a task run on the worker's loop (``server.quick_tasks``)
_OPTIONAL = {"c_wake", "c_wake2", "w_wake", "w_wake2", "queue", "deliver", "w_take"}


def hop_inc(x: int) -> int:
    """``inc`` that notes when it starts and ends (in the task thread)."""
    _REC.append(("t_start", _ns()))
    y = x + 1
    _REC.append(("t_end", _ns()))
    return y


class _Wakes(trio.abc.Instrument):
    def __init__(self, name: str) -> None:
        self.name = name
        self.sleep = name[0] + "_sleep"

    def before_io_wait(self, timeout: float) -> None:
        if timeout > 0:
            _REC.append((self.sleep, _ns()))

    def after_io_wait(self, timeout: float) -> None:
        if timeout > 0:  # (a loop with runnable tasks polls without sleeping: no wake-up)
            _REC.append((self.name, _ns()))


# Hooks: ``fn`` wrapped to note ``(name, perf_counter_ns)`` in ``rec`` (this module's
# record list unless told; ``benchmarks.worker_steps`` passes its own).
Records = list[tuple[str, int]]


def _after(name: str, fn: Callable[..., Any], rec: Records = _REC) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        rec.append((name, _ns()))
        return out

    return wrapper


def _before(name: str, fn: Callable[..., Any], rec: Records = _REC) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        rec.append((name, _ns()))
        return fn(*args, **kwargs)

    return wrapper


def _around(
    first: str, then: str, fn: Callable[..., Any], rec: Records = _REC
) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        rec.append((first, _ns()))
        out = fn(*args, **kwargs)
        rec.append((then, _ns()))
        return out

    return wrapper


def _after_async(name: str, fn: Callable[..., Any], rec: Records = _REC) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = await fn(*args, **kwargs)
        rec.append((name, _ns()))
        return out

    return wrapper


def _patch_tcp(write: str, read: str) -> None:
    from trioscheduler.wire.tcp import TCPStream

    TCPStream._send_now = _before(write, TCPStream._send_now)  # type: ignore[method-assign]
    TCPStream._sendall = _before(write, TCPStream._sendall)  # type: ignore[method-assign]
    TCPStream._read_message = _after_async(read, TCPStream._read_message)  # type: ignore[method-assign]


def install_worker() -> None:
    """(In a worker's loop: ``client.run``.) Hook the worker's hops."""
    from trioscheduler.server.executor import ThreadExecutor

    _patch_tcp("w_write", "w_read")
    ThreadExecutor._queue = _before("queue", ThreadExecutor._queue)  # type: ignore[method-assign]
    ThreadExecutor.deliver = _before("deliver", ThreadExecutor.deliver)  # type: ignore[method-assign]
    ThreadExecutor.take = _before("w_take", ThreadExecutor.take)  # type: ignore[method-assign]
    trio.lowlevel.add_instrument(_Wakes("w_wake"))


def install_client() -> None:
    """(In the client process's loop: ``run_on_scheduler``.) Hook its hops."""
    from trioscheduler.client.client import Client
    from trioscheduler.client.futures import KeyState

    _patch_tcp("c_write", "c_read")
    Client._emit_graph = _before("emit", Client._emit_graph)  # type: ignore[method-assign]
    Client._release_key = _before("c_release", Client._release_key)  # type: ignore[method-assign]
    KeyState._settle = _before("settle", KeyState._settle)  # type: ignore[method-assign]
    trio.lowlevel.add_instrument(_Wakes("c_wake"))


def take_records() -> list[tuple[str, int]]:
    out = list(_REC)
    _REC.clear()
    return out


_WORKER_HOPS = {
    "w_wake", "w_read", "queue", "t_start", "t_end", "deliver", "w_wake2", "w_take", "w_write",
}  # fmt: skip


def _by_hop(records: list[tuple[str, int]]) -> dict[str, list[int]]:
    by: dict[str, list[int]] = {}
    for name, t in records:
        by.setdefault(name, []).append(t)
    for ts in by.values():
        ts.sort()
    return by


def chain(
    client: list[tuple[str, int]], workers: list[list[tuple[str, int]]]
) -> dict[str, list[float]]:
    """Per hop, the microseconds since the previous hop, over the round trips where
    every hop was found in order (each the first of its kind after the one before; the
    worker's hops in the worker that ran the task)."""
    own = _by_hop(client)
    theirs = [_by_hop(w) for w in workers]
    starts, ends, posted = own.get("submit", []), own.get("released", []), own.get("posted", [])
    gaps: dict[str, list[float]] = {h: [] for h in ["posted", *HOPS[1:]]}
    missed: dict[str, int] = {}
    for t0, t_end in zip(starts, ends, strict=False):
        ran = [w for w in theirs if _first(w.get("t_start", []), t0, t_end) is not None]
        if len(ran) != 1:
            continue
        prev = t0
        row: dict[str, float] = {}
        hops = HOPS[1:]
        for k, hop in enumerate(hops):
            by = ran[0] if hop in _WORKER_HOPS else own
            t = _first(by.get(_RECORDED.get(hop, hop), []), prev, t_end)
            if hop in _OPTIONAL:  # none if the loop was awake, or the task ran on the loop
                nxt = next(h for h in hops[k + 1 :] if h not in _OPTIONAL)
                by_next = ran[0] if nxt in _WORKER_HOPS else own
                t_next = _first(by_next.get(nxt, []), prev, t_end)
                if t is None or t_next is None or t > t_next:
                    row[hop] = 0.0
                    missed[hop] = missed.get(hop, 0) + 1
                    continue
            if t is None:
                missed[hop] = missed.get(hop, 0) + 1
                break
            row[hop] = (t - prev) / 1e3
            prev = t
        else:
            for hop, v in row.items():
                gaps[hop].append(v)
            t = _first(posted, t0, t_end)
            if t is not None:
                gaps["posted"].append((t - t0) / 1e3)
    gaps["missed"] = missed  # type: ignore[assignment]
    return gaps


def _first(ts: list[int], lo: int, hi: int) -> int | None:
    j = bisect.bisect_left(ts, lo)
    return ts[j] if j < len(ts) and ts[j] <= hi else None


def stamped_round_trips(client: Any, n: int) -> list[int]:
    """``n`` of ``submit(hop_inc, i, pure=False).result()``, the user thread's hops noted
    (``submit``, ``posted``, ``woken``, ``released``); each round trip's nanoseconds."""
    lat = []
    rec = _REC
    for i in range(n):
        t = _ns()
        rec.append(("submit", t))
        fut = client.submit(hop_inc, i, pure=False)
        rec.append(("posted", _ns()))
        fut.result()
        rec.append(("woken", _ns()))
        del fut
        t1 = _ns()
        rec.append(("released", t1))
        lat.append(t1 - t)
    return lat


def sample(n: int) -> dict[str, Any]:
    import trioscheduler

    kw = {"n_workers": 2, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    with trioscheduler.LocalCluster(**kw) as cluster, trioscheduler.Client(cluster) as client:
        for i in range(200):
            client.submit(hop_inc, i, pure=False).result()
        client.run(install_worker)
        client.run_on_scheduler(install_client)
        for i in range(50):
            client.submit(hop_inc, i, pure=False).result()
        client.run(take_records)
        client.run_on_scheduler(take_records)
        lat = stamped_round_trips(client, n)
        records = take_records()
        workers = list(client.run(take_records).values())
    gaps = chain(records, workers)
    out: dict[str, Any] = {
        "p50_ms": statistics.median(lat) / 1e6,
        "complete": len(gaps["released"]) / n,
        "missed": gaps.pop("missed"),
    }
    for hop in ["posted", *HOPS[1:]]:
        v = sorted(gaps[hop])
        if v:
            out[hop] = round(statistics.median(v), 1)
            out[hop + "_p90"] = round(v[int(len(v) * 0.9)], 1)
    out["sum_of_medians_us"] = round(sum(out[h] for h in HOPS[1:] if h in out), 1)
    out["load"] = os.getloadavg()[0]
    return out


def main(argv: list[str]) -> None:
    step_tool("benchmarks.round_trip_hops", sample, "p50_ms", argv)


if __name__ == "__main__":
    # by its module name, so that the functions sent to the loops are pickled by
    # reference and share that module's _REC in each process
    from benchmarks import round_trip_hops

    round_trip_hops.main(sys.argv[1:])
