"""Hosting plugins in the scheduler, the workers and the nannies.

The scheduler keeps every registered plugin by name (``SchedulerPlugins``): its own
plugins as objects, worker and nanny plugins as the pickled bytes a client sent. A
worker plugin is set up on every worker now, and on every worker that joins later (a
new one, or one a nanny restarted) *before* the scheduler's core learns of the worker,
as uploaded files are: no task reaches a worker without the plugins. A nanny plugin is
set up on every nanny now and on the nanny of every worker that joins later (a nanny
that has it already skips it, so a ``restart = True`` plugin restarts a worker once).

Registering under a name in use replaces the old plugin (its ``close``/``teardown``
runs first) unless the plugin or the call says ``idempotent``: then nothing happens.
A plugin whose ``start``/``setup`` fails at registration is not kept (it would fail
again on every later worker; dask keeps it) and the error goes back to the client.

Every hook is called through ``_Guard``: one that raises is logged once per plugin and
hook (later failures are counted), reported to the client that registered the plugin
(``{"op": "plugin-error"}`` on its stream; a worker's go to the scheduler first), and
otherwise ignored. A hook that returns an awaitable runs in the background.

Transitions reach plugins through the cores' story logs (``StoryLog.tap``): only while a
plugin with a ``transition`` hook is registered does a transition cost more than today.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import cloudpickle
import trio

from trioscheduler.core import messages as m
from trioscheduler.wire.remote_error import pack_exception

if TYPE_CHECKING:
    from trioscheduler.server.nanny import Nanny
    from trioscheduler.server.scheduler import Scheduler
    from trioscheduler.server.worker import Worker

__all__ = [
    "NannyPlugins",
    "SchedulerPlugins",
    "WorkerPlugins",
    "install_worker_plugin",
    "remove_worker_plugin",
]

logger = logging.getLogger("trioscheduler.plugins")

_SCHEDULER_HOOKS = (
    "update_graph", "transition", "add_worker", "remove_worker", "add_client", "remove_client",
    "restart",
)  # fmt: skip


_BASE_MODULES = ("trioscheduler.plugins.base", "distributed.diagnostics.plugin")
_BASES = ("SchedulerPlugin", "WorkerPlugin", "NannyPlugin")


def overrides(plugin: Any, hook: str) -> bool:
    """Does ``plugin`` define ``hook`` other than as the base class's no-op?

    Duck-typed plugins (no base class) count when they have the attribute at all.
    """
    fn = getattr(type(plugin), hook, None)
    if fn is None:
        return callable(getattr(plugin, hook, None))
    for klass in type(plugin).__mro__:
        if hook in vars(klass):
            return not (klass.__module__ in _BASE_MODULES and klass.__qualname__ in _BASES)
    return False


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _Guard:
    """Calls hooks; a failure is logged once per (plugin, hook), then counted, and
    handed to ``report`` (which tells the registering client)."""

    def __init__(self, where: str, report: Callable[[str, str, BaseException, int], None]) -> None:
        self.where = where
        self.report = report
        self.failures: dict[tuple[str, str], int] = {}
        self.spawn: Callable[[Any], None] | None = None  # runs an awaitable in background

    def failed(self, name: str, hook: str, exc: BaseException) -> None:
        n = self.failures.get((name, hook), 0) + 1
        self.failures[(name, hook)] = n
        if n == 1:
            logger.warning(
                "%s: plugin %r: %s raised %s (reported to its client; later failures of this "
                "hook are counted, not logged)", self.where, name, hook, _error_text(exc),
                exc_info=exc,
            )  # fmt: skip
        self.report(name, hook, exc, n)

    def call(self, name: str, plugin: Any, hook: str, *args: Any, **kwargs: Any) -> None:
        """Call a hook synchronously; an awaitable result runs in the background."""
        try:
            result = getattr(plugin, hook)(*args, **kwargs)
        except Exception as exc:
            self.failed(name, hook, exc)
            return
        if inspect.isawaitable(result):
            if self.spawn is None:  # pragma: no cover - hosts set spawn before any hook
                result.close()  # type: ignore[attr-defined]
                return
            self.spawn(self.finish(name, hook, result))

    async def finish(self, name: str, hook: str, awaitable: Any) -> None:
        try:
            await awaitable
        except Exception as exc:
            self.failed(name, hook, exc)

    async def await_hook(self, name: str, plugin: Any, hook: str, *args: Any) -> None:
        """Call and await a hook (close, teardown): failures reported, never raised."""
        try:
            result = getattr(plugin, hook)(*args)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            self.failed(name, hook, exc)


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


# ----------------------------------------------------------------------------------------
# Scheduler
# ----------------------------------------------------------------------------------------


class SchedulerPlugins:
    """The scheduler's plugins: its own, and the worker and nanny plugins it hands out."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.plugins: dict[str, Any] = {}  # name -> SchedulerPlugin
        self.owners: dict[str, str | None] = {}  # plugin name -> client that registered it
        self.worker_plugins: dict[str, bytes] = {}  # name -> pickled WorkerPlugin
        self.nanny_plugins: dict[str, bytes] = {}  # name -> pickled NannyPlugin
        self.active = False  # any scheduler plugin with an event hook
        self._hooked: dict[str, list[tuple[str, Any]]] = {h: [] for h in _SCHEDULER_HOOKS}
        self._tap: Any = None  # the story log's tap while a plugin watches transitions
        self._workers: set[str] = set()
        self.guard = _Guard("scheduler", self._report)
        self.guard.spawn = self._spawn

    def _spawn(self, coro: Any) -> None:
        nursery = self.scheduler._nursery
        if nursery is None:
            coro.close()
        else:
            nursery.start_soon(_run_coroutine, coro)

    # -- reporting ------------------------------------------------------------------

    def _report(self, name: str, hook: str, exc: BaseException, count: int) -> None:
        self.tell_owner(name, hook, _error_text(exc), count, "scheduler")

    def tell_owner(self, name: str, hook: str, text: str, count: int, where: str) -> None:
        """Send a plugin's failure to the client that registered it (first one per hook)."""
        if count != 1:
            return
        client = self.owners.get(name)
        if client is not None:
            self.scheduler._send(
                self.scheduler._clients,
                client,
                {"op": "plugin-error", "plugin": name, "hook": hook, "text": text, "where": where},
            )

    def worker_reported(self, worker: str, msg: dict[str, Any]) -> None:
        """A worker's plugin hook failed (the worker logged it): tell the owner."""
        name, hook = str(msg.get("plugin")), str(msg.get("hook"))
        logger.warning("worker %s: plugin %r: %s raised %s", worker, name, hook, msg.get("text"))
        self.tell_owner(name, hook, str(msg.get("text")), 1, f"worker {worker}")

    # -- scheduler plugins ------------------------------------------------------------

    def _rebuild(self) -> None:
        for hook in _SCHEDULER_HOOKS:
            self._hooked[hook] = [
                (name, p) for name, p in self.plugins.items() if overrides(p, hook)
            ]
        self.active = any(self._hooked.values())
        self._workers = set(self.scheduler.state.workers)
        if self._hooked["transition"]:
            if self._tap is None:
                self._tap = self.scheduler.state.log_tap(True)
        elif self._tap is not None:
            self.scheduler.state.log_tap(False)
            self._tap = None

    async def add(self, plugin: Any, name: str, idempotent: bool, client: str | None) -> bool:
        """Start and keep ``plugin``; False if an idempotent one of that name was kept.
        ``start`` raising propagates (the plugin is not kept)."""
        if name in self.plugins and idempotent:
            return False
        await self.remove(name)
        if hasattr(plugin, "start"):
            await _maybe_await(plugin.start(self.scheduler))
        self.plugins[name] = plugin
        self.owners[name] = client
        self._rebuild()
        return True

    async def remove(self, name: str) -> bool:
        plugin = self.plugins.pop(name, None)
        if plugin is None:
            return False
        self._rebuild()
        if hasattr(plugin, "close"):
            await self.guard.await_hook(name, plugin, "close")
        if not self.worker_plugins.get(name) and not self.nanny_plugins.get(name):
            self.owners.pop(name, None)
        return True

    async def close_all(self) -> None:
        """The scheduler closes: ``before_close`` then ``close`` of every plugin."""
        for name, plugin in list(self.plugins.items()):
            if hasattr(plugin, "before_close"):
                await self.guard.await_hook(name, plugin, "before_close")
        for name in list(self.plugins):
            await self.remove(name)

    def call(self, hook: str, *args: Any, **kwargs: Any) -> None:
        for name, plugin in self._hooked[hook]:
            self.guard.call(name, plugin, hook, *args, **kwargs)

    def after(self, events: tuple[Any, ...]) -> None:
        """After the core handled ``events``: the hooks they call for, in order."""
        sched = self.scheduler
        hooked = self._hooked
        for ev in events:
            t = type(ev)
            if t is m.UpdateGraph and hooked["update_graph"]:
                self.call(
                    "update_graph",
                    sched,
                    client=ev.client,
                    keys=set(ev.keys),
                    tasks=[spec.key for spec in ev.tasks],
                    annotations={},
                    priority={spec.key: spec.priority for spec in ev.tasks},
                    dependencies={spec.key: set(spec.dependencies) for spec in ev.tasks},
                    stimulus_id=ev.stimulus_id,
                )
            elif t is m.AddClient and ev.client != m.FIRE_AND_FORGET:
                self.call("add_client", sched, client=ev.client)
            elif t is m.RemoveClient and ev.client != m.FIRE_AND_FORGET:
                self.call("remove_client", sched, client=ev.client)
        if hooked["add_worker"] or hooked["remove_worker"]:
            now = set(sched.state.workers)
            if now != self._workers:
                gone, new = self._workers - now, now - self._workers
                self._workers = now
                stim = events[-1].stimulus_id if events else "plugins"
                for addr in sorted(gone):
                    self.call("remove_worker", sched, worker=addr, stimulus_id=stim)
                for addr in sorted(new):
                    self.call("add_worker", sched, worker=addr)
        if self._tap is not None and self._tap[0]:  # after update_graph, as in dask
            keys, starts, finishes, stimuli, _ = self._tap
            entries = list(zip(keys, starts, finishes, stimuli, strict=True))
            for column in self._tap:
                column.clear()
            for key, start, finish, stim in entries:
                self.call("transition", key, start, finish, stimulus_id=stim)

    # -- worker and nanny plugins ------------------------------------------------------

    async def add_worker_plugin(
        self, blob: bytes, name: str, idempotent: bool, client: str | None
    ) -> dict[str, dict[str, Any]]:
        """Set a worker plugin up on every worker: ``{address: reply}``. Not kept if any
        worker failed (and taken off those that succeeded)."""
        if name in self.worker_plugins and idempotent:
            return {}
        self.worker_plugins[name] = blob
        self.owners[name] = client
        payload = cloudpickle.dumps((install_worker_plugin, (name, blob), {}), protocol=5)
        replies = await self._each_worker(payload)
        if any(r.get("status") != "OK" for r in replies.values()):
            await self.remove_worker_plugin(name)
        return replies

    async def remove_worker_plugin(self, name: str) -> dict[str, dict[str, Any]]:
        if self.worker_plugins.pop(name, None) is None:
            return {}
        payload = cloudpickle.dumps((remove_worker_plugin, (name,), {}), protocol=5)
        return await self._each_worker(payload)

    async def _each_worker(self, payload: bytes) -> dict[str, dict[str, Any]]:
        replies: dict[str, dict[str, Any]] = {}

        async def one(addr: str) -> None:
            replies[addr] = await self.scheduler._run_on_worker(addr, payload, 300.0)

        async with trio.open_nursery() as nursery:
            for addr in sorted(self.scheduler.state.workers):
                nursery.start_soon(one, addr)
        return replies

    async def add_nanny_plugin(
        self, blob: bytes, name: str, idempotent: bool, client: str | None
    ) -> dict[str, dict[str, Any]]:
        """Set a nanny plugin up on the nanny of every worker: ``{nanny: reply}``."""
        if name in self.nanny_plugins and idempotent:
            return {}
        self.nanny_plugins[name] = blob
        self.owners[name] = client
        replies = await self._each_nanny({"op": "plugin_add", "name": name, "plugin": blob})
        if any(r.get("status") != "OK" for r in replies.values()):
            await self.remove_nanny_plugin(name)
        # Workers the plugin restarted are back before the client hears "done".
        restarted = [r["worker"] for r in replies.values() if r.get("worker")]
        with trio.move_on_after(120):
            while not all(a in self.scheduler.state.workers for a in restarted):
                await self.scheduler._workers_changed.wait()
        return replies

    async def remove_nanny_plugin(self, name: str) -> dict[str, dict[str, Any]]:
        if self.nanny_plugins.pop(name, None) is None:
            return {}
        return await self._each_nanny({"op": "plugin_remove", "name": name})

    async def _each_nanny(self, request: dict[str, Any]) -> dict[str, dict[str, Any]]:
        nannies = sorted({ws.nanny for ws in self.scheduler.state.workers.values() if ws.nanny})
        replies: dict[str, dict[str, Any]] = {}

        async def one(nanny: str) -> None:
            replies[nanny] = await self._ask_nanny(nanny, request)

        async with trio.open_nursery() as nursery:
            for nanny in nannies:
                nursery.start_soon(one, nanny)
        return replies

    async def _ask_nanny(self, nanny: str, request: dict[str, Any]) -> dict[str, Any]:
        pool = self.scheduler._pool
        assert pool is not None
        try:
            with trio.fail_after(600):
                async with pool.connect(nanny) as stream:
                    await stream.send(request)
                    reply: dict[str, Any] = await stream.receive()
                    return reply
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, trio.EndOfChannel) as exc:
            return {"status": "error", "text": f"could not reach nanny {nanny}: {exc!r}"}

    async def joining(self, addr: str, nanny: str | None) -> None:
        """A worker joins: set up every worker plugin on it (before its ``AddWorker``
        reaches the core); its nanny gets the nanny plugins it lacks, in the background
        (a ``restart = True`` plugin restarts this very worker)."""
        for name, blob in list(self.worker_plugins.items()):
            payload = cloudpickle.dumps((install_worker_plugin, (name, blob), {}), protocol=5)
            reply = await self.scheduler._run_on_worker(addr, payload, 300.0)
            if reply.get("status") != "OK":
                self.guard.failures[(name, "setup")] = 1
                logger.error("worker plugin %r: setup on %s failed: %s", name, addr, reply.get("text"))
                self.tell_owner(name, "setup", str(reply.get("text")), 1, f"worker {addr}")
        if nanny and self.nanny_plugins and self.scheduler._nursery is not None:
            self.scheduler._nursery.start_soon(self._sync_nanny, nanny)

    async def _sync_nanny(self, nanny: str) -> None:
        reply = await self._ask_nanny(
            nanny, {"op": "plugin_sync", "plugins": dict(self.nanny_plugins)}
        )
        for name, text in (reply.get("errors") or {}).items():
            logger.error("nanny plugin %r: setup on %s failed: %s", name, nanny, text)
            self.tell_owner(name, "setup", str(text), 1, f"nanny {nanny}")
        if reply.get("status") != "OK":  # the nanny is gone (closing, or lost)
            logger.info("nanny plugins on %s: %s", nanny, reply.get("text"))


async def _op_nanny_plugins(scheduler: Scheduler, request: dict[str, Any]) -> Any:
    """A starting nanny asks for the nanny plugins, to set them up before its worker."""
    return dict(scheduler.plugins.nanny_plugins)


async def _op_register_scheduler_plugin(scheduler: Scheduler, request: dict[str, Any]) -> Any:
    plugin = cloudpickle.loads(request["plugin"])
    try:
        added = await scheduler.plugins.add(
            plugin, str(request["name"]), bool(request.get("idempotent")), request.get("client")
        )
    except Exception as exc:
        blob, tb_blob, text, _ = pack_exception(exc)
        return {"error": [blob, tb_blob, text]}
    return {"added": added}


async def _op_unregister_scheduler_plugin(scheduler: Scheduler, request: dict[str, Any]) -> Any:
    return await scheduler.plugins.remove(str(request["name"]))


async def _op_register_worker_plugin(scheduler: Scheduler, request: dict[str, Any]) -> Any:
    add = scheduler.plugins.add_nanny_plugin if request.get("nanny") else (
        scheduler.plugins.add_worker_plugin
    )
    return await add(
        request["plugin"], str(request["name"]), bool(request.get("idempotent")),
        request.get("client"),
    )  # fmt: skip


async def _op_unregister_worker_plugin(scheduler: Scheduler, request: dict[str, Any]) -> Any:
    name = str(request["name"])
    if request.get("nanny"):
        if name not in scheduler.plugins.nanny_plugins:
            raise ValueError(f"no nanny plugin named {name!r} is registered")
        return await scheduler.plugins.remove_nanny_plugin(name)
    if name not in scheduler.plugins.worker_plugins:
        raise ValueError(f"no worker plugin named {name!r} is registered")
    return await scheduler.plugins.remove_worker_plugin(name)


RPC_HANDLERS: dict[str, Callable[[Any, dict[str, Any]], Any]] = {
    "register_scheduler_plugin": _op_register_scheduler_plugin,
    "unregister_scheduler_plugin": _op_unregister_scheduler_plugin,
    "register_worker_plugin": _op_register_worker_plugin,
    "unregister_worker_plugin": _op_unregister_worker_plugin,
    "nanny_plugins": _op_nanny_plugins,
}


# ----------------------------------------------------------------------------------------
# Worker
# ----------------------------------------------------------------------------------------


class WorkerPlugins:
    """A worker's plugins; ``watching`` while one of them has a ``transition`` hook."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.plugins: dict[str, Any] = {}
        self.watching = False
        self._watchers: list[tuple[str, Any]] = []
        self._tap: Any = None
        self.guard = _Guard(f"worker {worker.address or '?'}", self._report)

    def _report(self, name: str, hook: str, exc: BaseException, count: int) -> None:
        if count == 1:  # the scheduler tells the client that registered the plugin
            self.worker._send(
                {"op": "plugin-error", "plugin": name, "hook": hook, "text": _error_text(exc)}
            )

    def _rewatch(self) -> None:
        self._watchers = [(n, p) for n, p in self.plugins.items() if overrides(p, "transition")]
        want = bool(self._watchers)
        state = self.worker.state
        if want and self._tap is None and state is not None:
            self._tap = state.log_tap(True)
        elif not want and self._tap is not None:
            if state is not None:
                state.log_tap(False)
            self._tap = None
        self.watching = self._tap is not None
        self.guard.where = f"worker {self.worker.address}"
        self.guard.spawn = self._spawn

    def _spawn(self, coro: Any) -> None:
        self.worker._start(_run_coroutine, coro)

    async def add(self, name: str, plugin: Any) -> None:
        """Replace the plugin of that name (teardown first), then ``setup`` (which may
        raise: the plugin is then not kept)."""
        await self.remove(name)
        if hasattr(plugin, "setup"):
            await _maybe_await(plugin.setup(self.worker))
        self.plugins[name] = plugin
        self._rewatch()

    async def remove(self, name: str) -> bool:
        plugin = self.plugins.pop(name, None)
        if plugin is None:
            return False
        self._rewatch()
        if hasattr(plugin, "teardown"):
            await self.guard.await_hook(name, plugin, "teardown", self.worker)
        return True

    async def teardown_all(self) -> None:
        for name in list(self.plugins):
            await self.remove(name)

    def transitions(self) -> None:
        """Hand the transitions the core just recorded to the plugins that watch."""
        tap = self._tap
        if tap is None or not tap[0]:
            return
        keys, starts, finishes, stimuli, _ = tap
        entries = list(zip(keys, starts, finishes, stimuli, strict=True))
        for column in tap:
            column.clear()
        for key, start, finish, stim in entries:
            for name, plugin in self._watchers:
                self.guard.call(name, plugin, "transition", key, start, finish, stimulus_id=stim)


async def _run_coroutine(coro: Any) -> None:
    await coro


async def install_worker_plugin(name: str, blob: bytes, dask_worker: Any = None) -> str:
    """Run on a worker (a ``run`` request): unpickle and set up one plugin."""
    await dask_worker.plugins.add(name, cloudpickle.loads(blob))
    return name


async def remove_worker_plugin(name: str, dask_worker: Any = None) -> bool:
    removed: bool = await dask_worker.plugins.remove(name)
    return removed


# ----------------------------------------------------------------------------------------
# Nanny
# ----------------------------------------------------------------------------------------


class NannyPlugins:
    """A nanny's plugins, with the pickled bytes each came as (to skip one it has)."""

    def __init__(self, nanny: Nanny) -> None:
        self.nanny = nanny
        self.plugins: dict[str, tuple[bytes, Any]] = {}
        self.guard = _Guard("nanny", self._report)

    def _report(self, name: str, hook: str, exc: BaseException, count: int) -> None:
        pass  # a nanny has no stream to the scheduler: its failures are logged here

    async def add(self, name: str, blob: bytes) -> bool:
        """Set up one plugin (replacing one of that name); True if the worker should
        restart. ``setup`` raising propagates (the plugin is not kept)."""
        await self.remove(name)
        plugin = cloudpickle.loads(blob)
        if hasattr(plugin, "setup"):
            await _maybe_await(plugin.setup(self.nanny))
        self.plugins[name] = (blob, plugin)
        return bool(getattr(plugin, "restart", False))

    async def remove(self, name: str) -> bool:
        kept = self.plugins.pop(name, None)
        if kept is None:
            return False
        if hasattr(kept[1], "teardown"):
            await self.guard.await_hook(name, kept[1], "teardown", self.nanny)
        return True

    async def teardown_all(self) -> None:
        for name in list(self.plugins):
            await self.remove(name)

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """``plugin_add``, ``plugin_remove`` and ``plugin_sync`` requests."""
        op = request.get("op")
        if op == "plugin_remove":
            return {"status": "OK", "removed": await self.remove(str(request["name"]))}
        if op == "plugin_add":
            wanted = {str(request["name"]): request["plugin"]}
        else:  # plugin_sync: those the nanny lacks
            wanted = {
                name: blob
                for name, blob in dict(request["plugins"]).items()
                if self.plugins.get(name, (None,))[0] != blob
            }
        restart = False
        errors: dict[str, str] = {}
        for name, blob in wanted.items():
            try:
                restart = await self.add(name, blob) or restart
            except Exception as exc:
                if op == "plugin_add":
                    exc_blob, tb_blob, text, _ = pack_exception(exc)
                    return {
                        "status": "error", "exception": exc_blob, "traceback": tb_blob,
                        "text": text,
                    }  # fmt: skip
                logger.warning("nanny: plugin %r: setup raised %s", name, _error_text(exc))
                errors[name] = _error_text(exc)
        reply: dict[str, Any] = {"status": "OK", "errors": errors}
        if restart and self.nanny.worker_address is not None:
            reply["worker"] = await self.nanny.restart(
                f"restart after setting up plugin(s) {sorted(wanted)}"
            )
        return reply

    async def fetch(self) -> None:
        """Before the first worker starts: set up the scheduler's nanny plugins (as dask's
        nanny does when it registers). Failures are logged; the worker starts anyway."""
        from trioscheduler import wire
        from trioscheduler.wire.security import connect_args

        try:
            with trio.fail_after(30):
                stream = await wire.connect(
                    self.nanny.scheduler_address,
                    timeout=10,
                    role="nanny",
                    **connect_args(getattr(self.nanny, "security", None), "nanny"),
                )
                async with stream:
                    await stream.send({"op": "nanny_plugins"})
                    reply = await stream.receive()
        except Exception as exc:  # the worker's own connect reports an unreachable scheduler
            logger.info("nanny: could not ask the scheduler for plugins: %r", exc)
            return
        if not isinstance(reply, dict) or reply.get("status") != "OK":
            return
        for name, blob in dict(reply["result"]).items():
            try:
                await self.add(name, blob)
            except Exception as exc:
                logger.warning("nanny: plugin %r: setup raised %s", name, _error_text(exc))
