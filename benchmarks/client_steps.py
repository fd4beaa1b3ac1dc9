"""The client process's side of a lone round trip, step by step (the scheduler in it).

``python -m benchmarks.client_steps N``: a ``LocalCluster(2, 1, processes=True)``, a
warm-up, then ``N`` calls of ``submit(hop_inc, i, pure=False).result()`` while the client
process notes the time (``time.perf_counter_ns``) at each of these steps, in the order
they happened:

- ``submit`` / ``posted`` / ``woken`` / ``released``: the user thread, as in
  ``round_trip_hops``; ``c_wake`` / ``c_sleep``: the loop wakes / goes to sleep
- ``c_release``: the posted release runs; ``link_emit``: ``SchedulerLink.emit``;
  ``emit``: ``Client._emit_graph``; ``direct``: ``DirectSend.send_nowait`` (the client's
  message handed to the scheduler, ``server.client_stream``)
- ``feed`` / ``route`` / ``routed``: the scheduler's ``_feed``, and its ``_route``
  called / returned; ``feed_run``: a worker's events fed (``_feed_finished``)
- ``c_write`` / ``c_read``: just before ``sendmsg`` to a worker / a worker's message read
- ``dispatch``: the client takes a message of the scheduler; ``settle`` / ``settled``:
  the future is set (``KeyState._settle``: the user thread's lock is released in it)

Each hook is a wrapper of a shell function (~0.3 us each). Prints one JSON line: the most
frequent order's share of the round trips, and per pair of steps in that order
(``a->b``, ``a->b#2`` when it comes again) the median microseconds between them (over
those round trips), with the p50.

``python -m benchmarks.client_steps --ab ROUNDS N NAME=PYTHONPATH ...``: alternated
builds, as ``round_trip_hops --ab``.
"""

from __future__ import annotations

import collections
import os
import statistics
import sys
from typing import Any

import trio

from benchmarks import round_trip_hops as hops
from benchmarks._harness import step_tool


def install_client() -> None:
    """(In the client process's loop: ``run_on_scheduler``.) Hook its steps."""
    from trioscheduler.client.client import Client
    from trioscheduler.client.futures import KeyState
    from trioscheduler.client.link import SchedulerLink
    from trioscheduler.server.scheduler import Scheduler
    from trioscheduler.wire import batched
    from trioscheduler.wire.tcp import TCPStream

    before, after = hops._before, hops._after
    TCPStream._send_now = before("c_write", TCPStream._send_now)  # type: ignore[method-assign]
    TCPStream._sendall = before("c_write", TCPStream._sendall)  # type: ignore[method-assign]
    TCPStream._read_message = hops._after_async("c_read", TCPStream._read_message)  # type: ignore[method-assign]
    Client._emit_graph = before("emit", Client._emit_graph)  # type: ignore[method-assign]
    Client._release_key = before("c_release", Client._release_key)  # type: ignore[method-assign]
    SchedulerLink.emit = before("link_emit", SchedulerLink.emit)  # type: ignore[method-assign]
    SchedulerLink._dispatch = before("dispatch", SchedulerLink._dispatch)  # type: ignore[method-assign]
    batched.DirectSend.send_nowait = before("direct", batched.DirectSend.send_nowait)  # type: ignore[method-assign]
    Scheduler._feed = before("feed", Scheduler._feed)  # type: ignore[method-assign]
    Scheduler._route = after("routed", before("route", Scheduler._route))  # type: ignore[method-assign]
    Scheduler._feed_finished = before("feed_run", Scheduler._feed_finished)  # type: ignore[method-assign]
    KeyState._settle = after("settled", before("settle", KeyState._settle))  # type: ignore[method-assign]
    trio.lowlevel.add_instrument(hops._Wakes("c_wake"))


def steps(records: list[tuple[str, int]]) -> dict[str, Any]:
    """The most frequent order of steps between two ``submit``s, and the median gaps."""
    windows: list[list[tuple[str, int]]] = []
    for name, t in sorted(records, key=lambda r: r[1]):
        if name == "submit":
            windows.append([])
        if windows:
            windows[-1].append((name, t))
    orders = collections.Counter(tuple(n for n, _ in w) for w in windows)
    order, count = orders.most_common(1)[0]
    gaps: list[list[float]] = [[] for _ in order[1:]]
    for w in windows:
        if tuple(n for n, _ in w) == order:
            for i, ((_, a), (_, b)) in enumerate(zip(w, w[1:], strict=False)):
                gaps[i].append((b - a) / 1e3)
    return {
        "share": round(count / len(windows), 3),
        "steps": [
            [f"{a}->{b}", round(statistics.median(g), 1)]
            for a, b, g in zip(order[:-1], order[1:], gaps, strict=True)
        ],
    }


def sample(n: int) -> dict[str, Any]:
    import trioscheduler

    kw = {"n_workers": 2, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    with trioscheduler.LocalCluster(**kw) as cluster, trioscheduler.Client(cluster) as client:
        for i in range(200):
            client.submit(hops.hop_inc, i, pure=False).result()
        client.run_on_scheduler(install_client)
        for i in range(50):
            client.submit(hops.hop_inc, i, pure=False).result()
        hops.take_records()
        lat = hops.stamped_round_trips(client, n)
        records = hops.take_records()
    out: dict[str, Any] = {"p50_ms": statistics.median(lat) / 1e6}
    found = steps(records)
    out["share"] = found["share"]
    for name, us in found["steps"]:
        k = 2
        key = name
        while key in out:  # a pair of steps seen again (two feeds in one step...)
            key, k = f"{name}#{k}", k + 1
        out[key] = us
    out["load"] = os.getloadavg()[0]
    return out


def main(argv: list[str]) -> None:
    step_tool("benchmarks.client_steps", sample, "p50_ms", argv)


if __name__ == "__main__":
    # by its module name, so that the hooks sent to the loop are pickled by reference
    from benchmarks import client_steps

    client_steps.main(sys.argv[1:])
