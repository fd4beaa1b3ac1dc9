"""``Client.register_plugin`` and friends: plugins sent to the scheduler, which hosts
them (``server.plugins``) and hands worker and nanny plugins to every worker and nanny.

A plugin is pickled here (cloudpickle; the scheduler trusts its clients as it does for
``run_on_scheduler``). A ``start``/``setup`` that raises at registration raises here,
with its original type and traceback; a hook that raises later is logged on the
scheduler or worker and reported to this client, which logs it as a warning on the
``trioscheduler.plugins`` logger (once per plugin and hook).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import cloudpickle

from trioscheduler.client.base import ClientBase
from trioscheduler.errors import TrioSchedulerError
from trioscheduler.plugins.base import NannyPlugin, SchedulerPlugin, WorkerPlugin, plugin_name
from trioscheduler.wire.remote_error import unpack_exception

__all__ = ["PluginMethods", "report_plugin_error"]

logger = logging.getLogger("trioscheduler.plugins")


def report_plugin_error(client_id: str, msg: dict[str, Any]) -> None:
    """The scheduler says a plugin this client registered failed in a hook."""
    logger.warning(
        "client %s: plugin %r: hook %s raised on %s: %s",
        client_id, msg.get("plugin"), msg.get("hook"), msg.get("where", "a worker"),
        msg.get("text"),
    )  # fmt: skip


def _raise_replies(name: str, kind: str, replies: dict[str, dict[str, Any]]) -> None:
    failed = {addr: r for addr, r in replies.items() if r.get("status") != "OK"}
    if not failed:
        return
    first: BaseException | None = None
    lines = []
    for addr, reply in sorted(failed.items()):
        lines.append(f"  {addr}: {reply.get('text')}")
        if first is None and reply.get("exception") is not None:
            first = unpack_exception(reply["exception"], reply.get("traceback") or b"", str(reply.get("text")))
    exc = first if first is not None else TrioSchedulerError(f"{kind} plugin {name!r} failed")
    exc.add_note(
        f"setting up {kind} plugin {name!r} failed on {len(failed)} of {len(replies)} "
        f"{kind}s (they keep running; the plugin was not kept):\n" + "\n".join(lines)
    )
    raise exc


async def register(
    client: ClientBase, kind: str, blob: bytes, name: str, idempotent: bool
) -> Any:
    if kind == "scheduler":
        reply = await client.rpc(
            {"op": "register_scheduler_plugin", "plugin": blob, "name": name,
             "idempotent": idempotent}
        )  # fmt: skip
        if "error" in reply:
            raise unpack_exception(*reply["error"])
        return None
    replies = await client.rpc(
        {"op": "register_worker_plugin", "plugin": blob, "name": name, "idempotent": idempotent,
         "nanny": kind == "nanny"}
    )  # fmt: skip
    _raise_replies(name, kind, replies)
    return {addr: {"status": "OK"} for addr in replies}


def _dask_kind(plugin: Any) -> str | None:
    """The kind of a plugin subclassing ``distributed``'s classes (if it is installed)."""
    if "distributed" not in type(plugin).__module__ and not any(
        k.__module__.startswith("distributed") for k in type(plugin).__mro__
    ):
        return None
    from distributed.diagnostics import plugin as dp

    for kind, klass in (
        ("scheduler", dp.SchedulerPlugin), ("nanny", dp.NannyPlugin), ("worker", dp.WorkerPlugin)
    ):
        if isinstance(plugin, klass):
            return kind
    return None


class PluginMethods(ClientBase):
    """``Client`` methods for plugins (mixed into ``Client``)."""

    def register_plugin(
        self,
        plugin: SchedulerPlugin | WorkerPlugin | NannyPlugin,
        name: str | None = None,
        idempotent: bool | None = None,
    ) -> Any:
        """Register ``plugin`` with the scheduler, every worker, or every nanny (by its
        class), now and for workers that join or restart later.

        ``name`` defaults to ``plugin.name`` (else a fresh one). Registering a name again
        replaces the plugin (teardown/close of the old one first) unless ``idempotent``
        (default: ``plugin.idempotent``), when it does nothing. A ``start``/``setup`` that
        raises raises here; the plugin is then not kept. Returns ``{address: {"status":
        "OK"}}`` for worker and nanny plugins, ``None`` for a scheduler plugin.
        """
        if isinstance(plugin, SchedulerPlugin):
            kind = "scheduler"
        elif isinstance(plugin, NannyPlugin):
            kind = "nanny"
        elif isinstance(plugin, WorkerPlugin):
            kind = "worker"
        elif (kind := _dask_kind(plugin)) is not None:
            pass
        else:
            raise TypeError(
                "register_plugin() takes a SchedulerPlugin, WorkerPlugin or NannyPlugin "
                f"(from trioscheduler or distributed), got {type(plugin).__name__}"
            )
        if name is None:
            name = plugin_name(plugin)
        if idempotent is None:
            idempotent = bool(getattr(plugin, "idempotent", False))
        blob = cloudpickle.dumps(plugin, protocol=5)
        return self.sync(register, self, kind, blob, name, idempotent)

    def register_worker_callbacks(self, setup: Callable[..., Any] | None = None) -> Any:
        """dask's older form of a worker plugin: run ``setup()`` (``setup(dask_worker=)``
        if it takes the worker) on every worker, now and on workers that join later."""
        if setup is None:
            raise TypeError("register_worker_callbacks() needs the setup function to run")
        from trioscheduler.plugins.builtin import WorkerSetup

        return self.register_plugin(WorkerSetup(setup))

    def unregister_worker_plugin(self, name: str, nanny: bool | None = None) -> Any:
        """Tear down the worker (``nanny=True``: nanny) plugin ``name`` everywhere; a name
        that is not registered raises ``ValueError``."""
        return self.sync(self._unregister_worker, name, bool(nanny))

    async def _unregister_worker(self, name: str, nanny: bool) -> Any:
        try:
            return await self.rpc({"op": "unregister_worker_plugin", "name": name, "nanny": nanny})
        except TrioSchedulerError as exc:
            if "ValueError" in str(exc):
                raise ValueError(f"no {'nanny' if nanny else 'worker'} plugin named {name!r}") from None
            raise

    def unregister_scheduler_plugin(self, name: str) -> Any:
        """Close and forget the scheduler plugin ``name`` (``ValueError`` if unknown)."""
        return self.sync(self._unregister_scheduler, name)

    async def _unregister_scheduler(self, name: str) -> None:
        if not await self.rpc({"op": "unregister_scheduler_plugin", "name": name}):
            raise ValueError(f"no scheduler plugin named {name!r} is registered")
