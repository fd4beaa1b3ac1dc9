"""Busy polling (``trioscheduler.wire.busy_poll``): what it saves and what it costs.

Each sample is a fresh ``python -m benchmarks.cpu_per_task`` subprocess (a
``LocalCluster(2, 1, processes=True)``), ours with busy polling as shipped and the
reference with ``TRIOSCHEDULER_BUSY_POLL_US=0``:

* ``busy-poll-latency``: p50 of 2,000 ``submit(inc, i, pure=False).result()`` (ms);
* ``busy-poll-cpu``: the CPU (user + system) the client process and the workers spent
  per round trip of the same runs (us): the price of the polling;
* ``busy-poll-map``: tasks/s of a map of 20,000 trivial tasks, which should not move
  (busy workers seldom poll; idle ones yield the CPU to what is runnable).
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks._harness import SharedRuns, child_result, register
from trioscheduler.wire.busy_poll import ENV

_shared = SharedRuns()  # the latency and CPU rows read the same runs


def _sample(row: str, mode: str, polling: bool, quick: bool) -> dict[str, Any]:
    def make() -> dict[str, Any]:
        env = dict(os.environ)
        if polling:
            env.pop(ENV, None)
        else:
            env[ENV] = "0"
        n = {"lat": 500 if quick else 2_000, "map": 2_000 if quick else 20_000}[mode]
        return child_result("benchmarks.cpu_per_task", mode, str(n), env=env)

    return _shared.take(row, (mode, polling), make)


def _cpu_per_task(sample: dict[str, Any]) -> float:
    return float(sample["client_us_per_task"] + sample["workers_us_per_task"])


register(
    "busy-poll-latency",
    description="p50 submit -> result (ms), busy polling on vs off (TRIOSCHEDULER_BUSY_POLL_US=0).",
    unit="ms", higher_is_better=False, reference_label="polling off",
    ours=lambda quick: _sample("latency", "lat", True, quick)["p50_ms"],
    reference=lambda quick: _sample("latency", "lat", False, quick)["p50_ms"],
)  # fmt: skip
register(
    "busy-poll-cpu",
    description="CPU us (client + workers) per round trip of the same runs: the polling's price.",
    unit="us", higher_is_better=False, reference_label="polling off",
    ours=lambda quick: _cpu_per_task(_sample("cpu", "lat", True, quick)),
    reference=lambda quick: _cpu_per_task(_sample("cpu", "lat", False, quick)),
)  # fmt: skip
register(
    "busy-poll-map",
    description="map of 20,000 trivial tasks (tasks/s), busy polling on vs off.",
    unit="tasks/s", reference_label="polling off",
    ours=lambda quick: _sample("map", "map", True, quick)["tasks_per_s"],
    reference=lambda quick: _sample("map", "map", False, quick)["tasks_per_s"],
)  # fmt: skip
