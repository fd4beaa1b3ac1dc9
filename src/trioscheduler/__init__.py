"""trioscheduler: the dask.distributed API on trio structured concurrency.

Only public names live here; everything else is private to its module. Every name but
the error classes loads on first access (PEP 562 module ``__getattr__``), so that a
worker process, which never needs the client, does not pay for importing it (and the
parts of dask it pulls in) at start-up.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from trioscheduler.errors import TrioSchedulerError, TrioSchedulerWarning

if TYPE_CHECKING:
    from trioscheduler._as_completed import as_completed
    from trioscheduler.client import Client, Executor, default_client, fire_and_forget
    from trioscheduler.cluster import LocalCluster, open_cluster
    from trioscheduler.collections import futures_of
    from trioscheduler.datasets import DatasetExistsError
    from trioscheduler.execute import Reschedule
    from trioscheduler.futures import Future, FutureCancelledError, wait
    from trioscheduler.nanny import Nanny
    from trioscheduler.progress import progress
    from trioscheduler.scheduler import Scheduler
    from trioscheduler.worker import Worker
    from trioscheduler.worker_client import (
        get_client,
        get_task_key,
        get_worker,
        local_client,
        rejoin,
        secede,
        worker_client,
    )

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
    "as_completed": "trioscheduler._as_completed",
    "Client": "trioscheduler.client",
    "Executor": "trioscheduler.client",
    "default_client": "trioscheduler.client",
    "fire_and_forget": "trioscheduler.client",
    "LocalCluster": "trioscheduler.cluster",
    "open_cluster": "trioscheduler.cluster",
    "futures_of": "trioscheduler.collections",
    "DatasetExistsError": "trioscheduler.datasets",
    "Reschedule": "trioscheduler.execute",
    "Future": "trioscheduler.futures",
    "FutureCancelledError": "trioscheduler.futures",
    "wait": "trioscheduler.futures",
    "Nanny": "trioscheduler.nanny",
    "progress": "trioscheduler.progress",
    "Scheduler": "trioscheduler.scheduler",
    "Worker": "trioscheduler.worker",
    "get_client": "trioscheduler.worker_client",
    "get_task_key": "trioscheduler.worker_client",
    "get_worker": "trioscheduler.worker_client",
    "local_client": "trioscheduler.worker_client",
    "rejoin": "trioscheduler.worker_client",
    "secede": "trioscheduler.worker_client",
    "worker_client": "trioscheduler.worker_client",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trioscheduler' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


# ``progress`` and ``worker_client`` are both a public function and the name of the module
# that defines it. Importing a submodule sets it as an attribute of this package, which
# would hide the function behind the module; the eager imports this file used to do
# overwrote it, and this keeps that: a submodule never replaces a public name here.
_SHADOWED = frozenset(name for name, module in _LAZY.items() if module == f"{__name__}.{name}")


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
