"""trioscheduler: the dask.distributed API on trio structured concurrency.

Only public names live here; everything else is private to its module. The runtime
pieces that import heavier modules (workers, nannies, clusters) load on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trioscheduler._as_completed import as_completed
from trioscheduler.client import Client, Executor, default_client, fire_and_forget
from trioscheduler.collections import futures_of
from trioscheduler.datasets import DatasetExistsError
from trioscheduler.errors import TrioSchedulerError, TrioSchedulerWarning
from trioscheduler.execute import Reschedule
from trioscheduler.futures import Future, FutureCancelledError, wait
from trioscheduler.progress import progress
from trioscheduler.scheduler import Scheduler
from trioscheduler.worker_client import (
    get_client,
    get_task_key,
    get_worker,
    local_client,
    rejoin,
    secede,
    worker_client,
)

if TYPE_CHECKING:
    from trioscheduler.cluster import LocalCluster, open_cluster
    from trioscheduler.nanny import Nanny
    from trioscheduler.worker import Worker

__all__ = [
    "Client",
    "DatasetExistsError",
    "Executor",
    "Future",
    "FutureCancelledError",
    "LocalCluster",
    "Nanny",
    "Reschedule",
    "Scheduler",
    "TrioSchedulerError",
    "TrioSchedulerWarning",
    "Worker",
    "as_completed",
    "default_client",
    "fire_and_forget",
    "futures_of",
    "get_client",
    "get_task_key",
    "get_worker",
    "local_client",
    "open_cluster",
    "progress",
    "rejoin",
    "secede",
    "wait",
    "worker_client",
]
__version__ = "0.1.0"

_LAZY = {
    "Worker": "trioscheduler.worker",
    "Nanny": "trioscheduler.nanny",
    "LocalCluster": "trioscheduler.cluster",
    "open_cluster": "trioscheduler.cluster",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trioscheduler' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
