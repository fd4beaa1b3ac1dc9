"""The plugin classes users subclass, with dask's hook names and signatures.

Every hook may be a plain or an ``async def`` method; the default does nothing, and
the host calls only hooks a subclass overrides (a scheduler with a plugin that has no
``transition`` pays nothing per transition). A hook that raises is logged, reported to
the client that registered the plugin, and otherwise ignored: no plugin can take a
scheduler, worker or nanny down.
"""

from __future__ import annotations

import uuid
from typing import Any

__all__ = ["CollectTaskMetadata", "NannyPlugin", "SchedulerPlugin", "WorkerPlugin", "plugin_name"]


class SchedulerPlugin:
    """Runs in the scheduler: ``start``/``close`` around its life, and a call per event.

    ``idempotent = True``: registering again under the same name does nothing (else the
    new plugin replaces the old one, whose ``close`` runs first).
    """

    idempotent: bool = False

    async def start(self, scheduler: Any) -> None:
        """When registered (or the scheduler starts with it)."""

    async def before_close(self) -> None:
        """Before the scheduler closes."""

    async def close(self) -> None:
        """When the scheduler closes or the plugin is replaced or unregistered."""

    def update_graph(
        self,
        scheduler: Any,
        *,
        client: str,
        keys: set[Any],
        tasks: list[Any],
        annotations: dict[str, Any],
        priority: dict[Any, Any],
        stimulus_id: str,
        **kwargs: Any,
    ) -> None:
        """A client submitted tasks (``tasks``) and wants ``keys``."""

    def restart(self, scheduler: Any) -> None:
        """The cluster restarts (``Client.restart``)."""

    def transition(
        self, key: Any, start: str, finish: str, *args: Any, stimulus_id: str, **kwargs: Any
    ) -> None:
        """A task moved from state ``start`` to ``finish``."""

    def add_worker(self, scheduler: Any, worker: str) -> None:
        """A worker joined (its address)."""

    def remove_worker(
        self, scheduler: Any, worker: str, *, stimulus_id: str, **kwargs: Any
    ) -> None:
        """A worker left or was lost."""

    def add_client(self, scheduler: Any, client: str) -> None:
        """A client connected."""

    def remove_client(self, scheduler: Any, client: str) -> None:
        """A client disconnected."""

    def log_event(self, topic: str, msg: Any) -> None:
        """An event was logged (not sent by this scheduler yet; kept for dask's API)."""


class WorkerPlugin:
    """Runs in every worker process: ``setup`` when it arrives there (at registration,
    and on every worker that joins or restarts later), ``teardown`` when the worker
    closes, ``transition`` for the worker's own task states."""

    idempotent: bool = False

    def setup(self, worker: Any) -> Any:
        """On each worker, before it runs tasks (joining workers) or at registration."""

    def teardown(self, worker: Any) -> Any:
        """When the worker closes, or the plugin is replaced or unregistered."""

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        """A task on this worker moved from ``start`` to ``finish``."""


class NannyPlugin:
    """Runs in every nanny (the process that keeps a worker process alive).

    ``restart = True``: the nanny restarts its worker after ``setup``, so that what
    ``setup`` changed (environment variables, installed packages, files on
    ``sys.path``) is what the new worker process starts with.
    """

    idempotent: bool = False
    restart: bool = False

    def setup(self, nanny: Any) -> Any:
        """On each nanny: at registration, and on nannies whose worker joins later."""

    def teardown(self, nanny: Any) -> Any:
        """When the nanny closes, or the plugin is replaced or unregistered."""


def plugin_name(plugin: Any) -> str:
    """The plugin's ``name`` attribute, else its class name and a fresh uuid (dask's rule:
    a plugin without a name is never the same plugin as another)."""
    name = getattr(plugin, "name", None)
    if isinstance(name, str) and name:
        return name
    return f"{type(plugin).__name__}-{uuid.uuid4()}"


class CollectTaskMetadata(SchedulerPlugin):
    """The scheduler side of ``get_task_metadata``: the final state (``memory`` or
    ``erred``) of every task submitted while it is registered."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.keys: set[Any] = set()
        self.metadata: dict[Any, Any] = {}
        self.state: dict[Any, str] = {}

    def update_graph(self, scheduler: Any, *, keys: set[Any], **kwargs: Any) -> None:
        self.keys.update(keys)
        self.keys.update(kwargs.get("tasks") or ())

    def transition(
        self, key: Any, start: str, finish: str, *args: Any, stimulus_id: str = "", **kwargs: Any
    ) -> None:
        if finish in ("memory", "erred") and key in self.keys:
            self.metadata[key] = {}  # tasks carry no metadata here (no set_metadata yet)
            self.state[key] = finish
            self.keys.discard(key)
