"""The client side: what a user's process runs to talk to a cluster.

Owns ``Client`` (a facade whose methods delegate to modules by concern: ``transfer``
for data movement, ``datasets``, ``collections``/``graph`` for dask graphs), ``Future``
and its waiting helpers (``futures``, ``as_completed``, ``progress``), key rules
(``keys``), ``worker_client`` for tasks that submit tasks, and ``performance_report``
(its HTML is ``http.report``'s).

May import: ``deploy`` (a Client given no address opens a ``LocalCluster``), ``server``
(public helpers only: task context, upload packing), subsystems, ``wire``, ``core``.
Nothing below imports this package. The public names load on first use, so that
``import trioscheduler.client.keys`` does not pull in dask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trioscheduler.client.client import Client, Executor, default_client, fire_and_forget

__all__ = ["Client", "Executor", "default_client", "fire_and_forget"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from trioscheduler.client import client

        return getattr(client, name)
    raise AttributeError(f"module 'trioscheduler.client' has no attribute {name!r}")
