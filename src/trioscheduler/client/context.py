"""Which client is current, and the client's own life: ``current``/``as_current``,
``start``/``shutdown``, ``loop``, the scheduler file and the dashboard link.

dask code finds "its" client in three ways, in this order: the client made current with
``with client.as_current():`` in this thread (or task), the default client (the newest
open one made with ``set_as_default=True``), or an explicit argument. ``current_client``
(a ``ContextVar``) holds the first; ``base.default_client`` consults it before the
default list, as dask's ``default_client`` does.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from trioscheduler.client.base import ClientBase, ClientClosedError, current_client
from trioscheduler.client.collections import futures_of as _futures_of
from trioscheduler.client.futures import Future

__all__ = ["ContextMethods"]


class ContextMethods(ClientBase):
    """``Client`` methods about which client is current and the client's lifetime."""

    @classmethod
    def current(cls, allow_global: bool = True) -> Any:
        """The client of ``with client.as_current():`` here, else (``allow_global``) the
        default client; ``ValueError`` if there is none, as in dask."""
        c = current_client.get()
        if c is not None:
            return c
        if allow_global:
            from trioscheduler.client.base import _defaults

            if _defaults:
                return _defaults[-1]
        raise ValueError(
            "No clients found. Start a client and point it to the scheduler address: "
            "from trioscheduler import Client; client = Client('tcp://address:port')"
        )

    @contextmanager
    def as_current(self) -> Iterator[None]:
        """Make this client ``Client.current()`` (and ``default_client()``) inside the block,
        for this thread or trio task only."""
        token = current_client.set(self)
        try:
            yield
        finally:
            current_client.reset(token)

    @property
    def loop(self) -> Any:
        """The loop running this client's session: the background ``LoopRunner`` of a sync
        client, ``None`` for an asynchronous one (it runs in the caller's trio task).

        dask returns a tornado ``IOLoop`` here; trioscheduler has none to give.
        """
        return None if self.asynchronous else self._runner

    def start(self, **kwargs: Any) -> None:
        """Start the client if it is not running. A sync client starts when it is made,
        so this is a no-op then (as dask's once started); a closed client cannot restart."""
        if kwargs:
            raise TypeError(f"start() got unexpected keyword arguments {sorted(kwargs)}")
        if self.status in ("running", "newly-created") and not self.asynchronous:
            return
        if self.asynchronous and self.status == "newly-created":
            raise TypeError(
                "an asynchronous client starts with 'async with Client(..., asynchronous=True)'"
            )
        if self.status in ("closed", "closing"):
            raise ClientClosedError(f"{self!r} is closed; create a new Client")

    def shutdown(self) -> Any:
        """Close this client and the cluster it is connected to (its scheduler and workers),
        not only this client's own ``LocalCluster``. Asynchronous: the workers close and
        the client ends; a cluster opened with ``async with`` closes when its block ends."""
        cluster = self.cluster
        if self.asynchronous:
            return self._shutdown_async(cluster)
        if cluster is None and self.status == "running":
            self.sync(self.rpc, {"op": "terminate_workers"})
        self.close()
        if cluster is not None and not self._own_cluster:
            cluster.close()
        return None

    async def _shutdown_async(self, cluster: Any) -> None:
        # Structured: a cluster opened with ``async with`` is closed by its own block
        # (closing it from inside would tear its nursery out from under it), so here the
        # workers are told to close and the client ends; the block's exit does the rest.
        if self.status == "running":
            await self.rpc({"op": "terminate_workers"})
        await self._shutdown()

    def futures_of(self, futures: Any) -> list[Future]:
        """The futures of this client inside ``futures`` (collections, lists, dicts...).

        ``ValueError`` for a future of another client, as in dask.
        """
        found = _futures_of(futures)
        for f in found:
            if getattr(f, "client", self) is not self:
                raise ValueError(f"future {f.key!r} belongs to another client: {f.client!r}")
        return cast("list[Future]", found)

    def normalize_collection(self, collection: Any) -> Any:
        """``collection`` with the tasks this client already holds futures for replaced by
        those futures: a smaller graph that does not recompute them. The same object if
        nothing is held."""
        graph = collection.__dask_graph__()
        held = [k for k in graph if k in self.futures]
        if not held:
            return collection
        from dask._task_spec import DataNode

        new = dict(graph)
        for k in held:
            new[k] = DataNode(k, Future(k, cast("Any", self)))
        rebuild, args = collection.__dask_postpersist__()
        return rebuild(new, *args)

    def write_scheduler_file(self, scheduler_file: str) -> None:
        """Write the scheduler's address to ``scheduler_file`` (JSON, dask's format), for
        ``Client(scheduler_file=...)`` and ``trioscheduler worker --scheduler-file``."""
        if getattr(self, "scheduler_file", None):
            raise ValueError(f"this client already uses the scheduler file {self.scheduler_file}")
        if self.asynchronous:
            raise TypeError("write_scheduler_file needs a sync client")
        info = self.sync(self.rpc, {"op": "identity"})
        payload = {"type": "Scheduler", "address": self.scheduler_address, "id": info.get("id")}
        tmp = f"{scheduler_file}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, scheduler_file)
        self.scheduler_file = scheduler_file

    # -- how it shows -----------------------------------------------------------------

    def _totals(self) -> tuple[int, int, int] | None:
        """(workers, threads, memory) from the scheduler, when asking cannot block the
        loop (a sync client called from another thread)."""
        if self.asynchronous or self.status != "running":
            return None
        if threading.get_ident() == self._loop_ident:
            return None
        try:
            workers = self.sync(self.rpc, {"op": "scheduler_info"})["workers"]
        except Exception:
            return None
        return (
            len(workers),
            sum(w["nthreads"] for w in workers.values()),
            sum(w.get("memory_limit") or 0 for w in workers.values()),
        )

    def __repr__(self) -> str:
        from dask.utils import format_bytes

        if self.scheduler_address is None:
            return "<Client: No scheduler connected>"
        link = self.dashboard_link
        dashboard = f", dashboard={link!r}" if link else ""
        totals = self._totals()
        if totals is None:
            return f"<Client: {self.scheduler_address!r} status={self.status}{dashboard}>"
        n, threads, memory = totals
        return (
            f"<Client: {self.scheduler_address!r} processes={n} threads={threads}, "
            f"memory={format_bytes(memory)}{dashboard}>"
        )

    def _repr_html_(self) -> str:
        from html import escape

        from dask.utils import format_bytes

        rows = [
            ("Client", self.id),
            ("Scheduler", str(self.scheduler_address)),
            ("Status", self.status),
        ]
        if self.cluster is not None:
            rows.append(("Cluster", type(self.cluster).__name__))
        totals = self._totals()
        if totals is not None:
            n, threads, memory = totals
            rows += [
                ("Workers", str(n)),
                ("Threads", str(threads)),
                ("Memory", format_bytes(memory)),
            ]
        link = self.dashboard_link
        body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
        if link:
            body += (
                f'<tr><th>Dashboard</th><td><a href="{escape(link)}">{escape(link)}</a></td></tr>'
            )
        return f"<div><h3>Client</h3><table>{body}</table></div>"

    @property
    def dashboard_link(self) -> str | None:
        """The dashboard's URL, or ``None`` while the scheduler serves no dashboard: the
        cluster's, else the one the scheduler announced (``ClientBase.dashboard_link``)."""
        link = getattr(self.cluster, "dashboard_link", None)
        if isinstance(link, str) and link:
            return link
        announced = super().dashboard_link
        return announced if isinstance(announced, str) else None
