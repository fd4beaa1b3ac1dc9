"""trioscheduler: the dask.distributed API on trio structured concurrency.

Only public names live here; everything else is private to its module. Every name but
the error classes loads on first access (PEP 562 module ``__getattr__``), so that a
worker process, which never needs the client, does not pay for importing it (and the
parts of dask it pulls in) at start-up.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from trioscheduler import _legacy
from trioscheduler._version import __version__ as __version__
from trioscheduler.errors import TrioSchedulerError, TrioSchedulerWarning

if TYPE_CHECKING:
    from trioscheduler.client.actors import Actor, ActorFuture, BaseActorFuture
    from trioscheduler.client.as_completed import as_completed
    from trioscheduler.client.client import Client, Executor, default_client, fire_and_forget
    from trioscheduler.client.collections import futures_of
    from trioscheduler.client.compat import CompatibleExecutor, config, dask, print, warn
    from trioscheduler.client.coordination import (
        Event,
        Lock,
        MultiLock,
        Queue,
        Semaphore,
        Variable,
    )
    from trioscheduler.client.diagnostics import get_task_stream
    from trioscheduler.client.futures import Future, FutureCancelledError, wait
    from trioscheduler.client.performance_report import performance_report
    from trioscheduler.client.progress import progress
    from trioscheduler.client.task_metadata import get_task_metadata, span
    from trioscheduler.client.worker_client import (
        get_client,
        get_task_key,
        get_worker,
        local_client,
        rejoin,
        secede,
        worker_client,
    )
    from trioscheduler.core.errors import KilledWorker
    from trioscheduler.core.status import Status
    from trioscheduler.deploy.adaptive import Adaptive
    from trioscheduler.deploy.cluster import LocalCluster, open_cluster
    from trioscheduler.deploy.ssh import SSHCluster
    from trioscheduler.environments.errors import EnvironmentRefusedError
    from trioscheduler.plugins import (
        CondaInstall,
        Environ,
        InstallPlugin,
        NannyPlugin,
        PipInstall,
        SchedulerPlugin,
        UploadDirectory,
        UploadFile,
        WorkerPlugin,
    )
    from trioscheduler.server.datasets import DatasetExistsError
    from trioscheduler.server.nanny import Nanny
    from trioscheduler.server.scheduler import Scheduler
    from trioscheduler.server.task_context import Reschedule
    from trioscheduler.server.worker import Worker
    from trioscheduler.wire.security import Security

__all__ = [
    "Actor",
    "ActorFuture",
    "Adaptive",
    "BaseActorFuture",
    "CancelledError",
    "Client",
    "CompatibleExecutor",
    "CondaInstall",
    "DatasetExistsError",
    "Environ",
    "EnvironmentRefusedError",
    "Event",
    "Executor",
    "Future",
    "FutureCancelledError",
    "InstallPlugin",
    "KilledWorker",
    "LocalCluster",
    "Lock",
    "MultiLock",
    "Nanny",
    "NannyPlugin",
    "PipInstall",
    "Queue",
    "Reschedule",
    "SSHCluster",
    "Scheduler",
    "SchedulerPlugin",
    "Security",
    "Semaphore",
    "Status",
    "TimeoutError",
    "TrioSchedulerError",
    "TrioSchedulerWarning",
    "UploadDirectory",
    "UploadFile",
    "Variable",
    "Worker",
    "WorkerPlugin",
    "as_completed",
    "config",
    "dask",
    "default_client",
    "fire_and_forget",
    "futures_of",
    "get_client",
    "get_task_key",
    "get_task_metadata",
    "get_task_stream",
    "get_worker",
    "local_client",
    "open_cluster",
    "performance_report",
    "print",
    "progress",
    "rejoin",
    "secede",
    "span",
    "wait",
    "warn",
    "worker_client",
]

_LAZY = {
    # dask's names for the standard errors: a cancelled future's result() raises a
    # subclass of the first; timeouts (Variable.get, Queue.get...) raise the second
    "CancelledError": "concurrent.futures",
    "TimeoutError": "builtins",
    "KilledWorker": "trioscheduler.core.errors",
    "Actor": "trioscheduler.client.actors",
    "ActorFuture": "trioscheduler.client.actors",
    "BaseActorFuture": "trioscheduler.client.actors",
    "Event": "trioscheduler.client.coordination",
    "Lock": "trioscheduler.client.coordination",
    "MultiLock": "trioscheduler.client.coordination",
    "Queue": "trioscheduler.client.coordination",
    "Semaphore": "trioscheduler.client.coordination",
    "Variable": "trioscheduler.client.coordination",
    "CompatibleExecutor": "trioscheduler.client.compat",
    "config": "trioscheduler.client.compat",
    "dask": "trioscheduler.client.compat",
    "print": "trioscheduler.client.compat",
    "warn": "trioscheduler.client.compat",
    "get_task_stream": "trioscheduler.client.diagnostics",
    "Status": "trioscheduler.core.status",
    "get_task_metadata": "trioscheduler.client.task_metadata",
    "span": "trioscheduler.client.task_metadata",
    "Adaptive": "trioscheduler.deploy.adaptive",
    "SchedulerPlugin": "trioscheduler.plugins",
    "WorkerPlugin": "trioscheduler.plugins",
    "NannyPlugin": "trioscheduler.plugins",
    "PipInstall": "trioscheduler.plugins",
    "InstallPlugin": "trioscheduler.plugins",
    "CondaInstall": "trioscheduler.plugins",
    "Environ": "trioscheduler.plugins",
    "UploadFile": "trioscheduler.plugins",
    "UploadDirectory": "trioscheduler.plugins",
    "as_completed": "trioscheduler.client.as_completed",
    "Client": "trioscheduler.client.client",
    "Executor": "trioscheduler.client.client",
    "default_client": "trioscheduler.client.client",
    "fire_and_forget": "trioscheduler.client.client",
    "LocalCluster": "trioscheduler.deploy.cluster",
    "open_cluster": "trioscheduler.deploy.cluster",
    "SSHCluster": "trioscheduler.deploy.ssh",
    "futures_of": "trioscheduler.client.collections",
    "DatasetExistsError": "trioscheduler.server.datasets",
    "EnvironmentRefusedError": "trioscheduler.environments.errors",
    "Reschedule": "trioscheduler.server.task_context",
    "Future": "trioscheduler.client.futures",
    "FutureCancelledError": "trioscheduler.client.futures",
    "wait": "trioscheduler.client.futures",
    "Nanny": "trioscheduler.server.nanny",
    "performance_report": "trioscheduler.client.performance_report",
    "progress": "trioscheduler.client.progress",
    "Scheduler": "trioscheduler.server.scheduler",
    "Security": "trioscheduler.wire.security",
    "Worker": "trioscheduler.server.worker",
    "get_client": "trioscheduler.client.worker_client",
    "get_task_key": "trioscheduler.client.worker_client",
    "get_worker": "trioscheduler.client.worker_client",
    "local_client": "trioscheduler.client.worker_client",
    "rejoin": "trioscheduler.client.worker_client",
    "secede": "trioscheduler.client.worker_client",
    "worker_client": "trioscheduler.client.worker_client",
}

_legacy.install()


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        import importlib

        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    old = sys.modules.get(f"{__name__}.{name}")
    if isinstance(old, _legacy.MovedModule):  # ``trioscheduler.scheduler``, an old path
        return old
    raise AttributeError(f"module 'trioscheduler' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
