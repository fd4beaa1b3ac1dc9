"""``/metrics``: Prometheus text format, through ``prometheus_client``, with dask's names.

Scrapers and Grafana boards written for dask keep working: ``dask_scheduler_clients``,
``dask_scheduler_workers``, ``dask_scheduler_tasks{state=...}``,
``dask_scheduler_task_groups`` (here: prefixes), ``dask_scheduler_tasks_output_bytes``,
``dask_scheduler_tasks_compute_seconds_total``, and the worker-side memory and transfer
families (``dask_worker_memory_bytes``, ``dask_worker_transfer_incoming_*``) with a
``worker`` label, since here the scheduler serves them from the workers' heartbeats.
Each scrape reads the shared snapshot; nothing is kept in a global registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from trioscheduler.http.snapshot import STATES, Snapshot
from trioscheduler.http.task_stream import TaskStream

__all__ = ["MetricsPage"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsPage:
    """Renders one scrape; built lazily (``prometheus_client`` is imported on first use)."""

    def __init__(self, snapshot: Callable[[], Snapshot], stream: TaskStream) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.process_collector import ProcessCollector

        self._snapshot = snapshot
        self._stream = stream
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total etc., as dask

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))


class _Collector:
    def __init__(self, page: MetricsPage) -> None:
        self.page = page

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self.page._snapshot()
        stream = self.page._stream
        c = snap.counts
        yield GaugeMetricFamily(
            "dask_scheduler_clients", "Number of clients connected", value=c["clients"]
        )
        workers = GaugeMetricFamily(
            "dask_scheduler_workers", "Number of workers known by scheduler", labels=["state"]
        )
        busy = sum(1 for w in snap.workers if w["processing"] and w["status"] == "running")
        idle = sum(1 for w in snap.workers if not w["processing"] and w["status"] == "running")
        workers.add_metric(["idle"], idle)
        workers.add_metric(["busy"], busy)
        workers.add_metric(["paused"], c["paused"])
        workers.add_metric(["retiring"], c["workers"] - idle - busy - c["paused"])
        yield workers
        tasks = GaugeMetricFamily(
            "dask_scheduler_tasks", "Number of tasks known by scheduler", labels=["state"]
        )
        for state in STATES:
            tasks.add_metric([state], c[state])
        yield tasks
        yield GaugeMetricFamily(
            "dask_scheduler_task_groups",
            "Number of task prefixes known by scheduler",
            value=len(snap.progress["name"]),
        )
        per_prefix = (
            (GaugeMetricFamily, "dask_scheduler_tasks_output_bytes",
             "Current number of bytes in memory (without duplicates) for each prefix",
             snap.prefix_nbytes),
            (CounterMetricFamily, "dask_scheduler_tasks_compute_seconds",
             "Total amount of compute time spent in each prefix (while recorded)",
             stream.compute_seconds),
        )  # fmt: skip
        for family, name, documentation, values in per_prefix:
            metric = family(name, documentation, labels=["task_prefix_name"])
            for prefix, value in sorted(values.items()):
                metric.add_metric([prefix], value)
            yield metric
        memory = GaugeMetricFamily(
            "dask_worker_memory_bytes", "Memory of each worker by type", labels=["worker", "type"]
        )
        for w in snap.workers:
            for kind in ("managed", "unmanaged", "spilled"):
                memory.add_metric([w["address"], kind], w[kind])
        yield memory
        incoming = CounterMetricFamily(
            "dask_worker_transfer_incoming_bytes",
            "Bytes fetched from other workers (while recorded)",
            labels=["worker"],
        )
        count = CounterMetricFamily(
            "dask_worker_transfer_incoming_count",
            "Transfers from other workers (while recorded)",
            labels=["worker"],
        )
        for worker, nbytes in sorted(stream.transfer_bytes.items()):
            incoming.add_metric([worker], nbytes)
            count.add_metric([worker], stream.transfer_count.get(worker, 0))
        yield incoming
        yield count
