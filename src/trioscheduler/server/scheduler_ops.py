"""The scheduler's request/response operations: one ``op_*`` function per RPC ``op``.

Kept apart from the shell (``scheduler.py``) so the shell stays about streams and the
core; each operation reads the scheduler's state and feeds it events the same way a
stream message would (``s._feed``), so nothing here decides what the core decides.
``HANDLERS`` maps each wire name (dask's where there is one) to its function; the
scheduler merges it with ``diagnostics.HANDLERS`` and the plugins' operations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from trioscheduler.core import messages as m
from trioscheduler.core.errors import RESTART_REASON
from trioscheduler.environments import EnvironmentRefusedError
from trioscheduler.environments.twophase import prepare_everywhere
from trioscheduler.server.calling import call_pickled
from trioscheduler.server.datasets import DatasetExistsError
from trioscheduler.server.uploads import install_payload
from trioscheduler.wire.remote_error import pack_exception

logger = logging.getLogger("trioscheduler.scheduler")

if TYPE_CHECKING:
    from trioscheduler.server.scheduler import Scheduler

__all__ = ["HANDLERS"]


async def op_identity(s: Scheduler, request: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "Scheduler",
        "address": s.address,
        "services": s.services(),
        "workers": {
            addr: s._worker_info(addr, ws) for addr, ws in s.state.workers.items()
        },
    }


async def op_who_has(s: Scheduler, request: dict[str, Any]) -> list[list[Any]]:
    tasks = s.state.tasks
    keys = request.get("keys")
    if keys is None:
        keys = list(tasks)
    out: list[list[Any]] = []
    for key in keys:
        ts = tasks.get(key)
        holders = (
            [w if isinstance(w, str) else str(w.address) for w in (getattr(ts, "who_has", None) or ())] if ts is not None else []
        )
        out.append([key, holders])
    return out


async def op_has_what(s: Scheduler, request: dict[str, Any]) -> dict[str, list[Any]]:
    workers = request.get("workers") or list(s.state.workers)
    out: dict[str, list[Any]] = {}
    for addr in workers:
        ws = s.state.workers.get(addr)
        if ws is not None:
            out[addr] = [getattr(ts, "key", ts) for ts in ws.has_what]
    return out


async def op_nthreads(s: Scheduler, request: dict[str, Any]) -> dict[str, int]:
    workers = request.get("workers")
    items = s.state.workers.items()
    return {
        addr: ws.nthreads
        for addr, ws in items
        if (not workers or addr in workers or getattr(ws, "name", None) in workers)
        and getattr(ws, "status", "running") == "running"
    }


async def op_wait_for_workers(s: Scheduler, request: dict[str, Any]) -> int:
    n = int(request.get("n_workers", 1))
    while len(s.state.workers) < n:
        await s._workers_changed.wait()
    return len(s.state.workers)


async def op_update_data(s: Scheduler, request: dict[str, Any]) -> list[Any]:
    """A client scattered data: ``items`` is ``[[key, [holders], nbytes], ...]``;
    ``seqs`` and ``incarnations`` what each holder's reply named (``UpdateData``).

    An RPC (not a stream event) so the client's next request sees the data. The reply:
    the keys not taken, none of whose holders is still the run that took them (a worker
    gone, or restarted at its address since): the client sends those again.
    """
    client = request.get("client")
    peer = s._clients.get(client) if isinstance(client, str) else None
    if peer is None or not isinstance(client, str):
        raise ValueError(f"update_data from unknown client {client!r}")
    items = request["items"]
    seqs = request.get("seqs")
    if seqs is not None and not (
        isinstance(seqs, dict) and all(isinstance(v, int) for v in seqs.values())
    ):
        raise ValueError(f"update_data: seqs must map worker addresses to ints, not {seqs!r:.100}")
    runs = request.get("incarnations")
    if runs is not None and not (
        isinstance(runs, dict) and all(isinstance(v, str) for v in runs.values())
    ):
        raise ValueError(f"update_data: incarnations must map addresses to str, not {runs!r:.100}")
    s._feed(
        m.UpdateData(
            s._stimulus("scatter"),
            trio.current_time(),
            client,
            {key: list(holders) for key, holders, _ in items},
            {key: nbytes for key, _, nbytes in items},
            seqs or None,
            runs or None,
        )
    )
    tasks = s.state.tasks
    return [
        key
        for key, _, _ in items
        if (ts := tasks.get(key)) is None or (not ts.who_has and ts.processing_on is None)
    ]


async def op_task_states(s: Scheduler, request: dict[str, Any]) -> list[list[Any]]:
    """``[[key, state], ...]`` for ``keys`` (or all tasks): for tests and dashboards."""
    tasks = s.state.tasks
    keys = request.get("keys")
    if keys is None:
        keys = list(tasks)
    return [[k, tasks[k].state if k in tasks else None] for k in keys]


async def op_publish_put(s: Scheduler, request: dict[str, Any]) -> str | None:
    """Publish ``items`` (``[[name, bytes, keys], ...]``); an error text if a name is taken."""
    try:
        s.datasets.put(request["items"], bool(request.get("override")))
    except DatasetExistsError as exc:
        return str(exc)
    return None


async def op_publish_get(s: Scheduler, request: dict[str, Any]) -> list[bytes | None]:
    return [s.datasets.get(name) for name in request["names"]]


async def op_publish_list(s: Scheduler, request: dict[str, Any]) -> list[Any]:
    return s.datasets.names()


async def op_publish_delete(s: Scheduler, request: dict[str, Any]) -> list[Any]:
    return [name for name in request["names"] if s.datasets.delete(name)]


async def op_upload_file(s: Scheduler, request: dict[str, Any]) -> dict[str, Any]:
    """Install a file on every worker; kept for later workers only if all succeeded.

    Returns ``{"workers": [...], "errors": {address: [exception, traceback, text]}}``.
    """
    filename, data = request["filename"], request["data"]
    load = bool(request.get("load", True))
    s.uploads.keep(filename, data, load)  # a worker joining meanwhile gets it too
    payload = install_payload(filename, data, load)
    workers = sorted(s.state.workers)
    errors: dict[str, list[Any]] = {}

    async def one(addr: str) -> None:
        reply = await s._run_on_worker(addr, payload, float(request.get("timeout", 60)))
        if reply.get("status") != "OK":
            errors[addr] = [reply.get("exception"), reply.get("traceback"), reply.get("text")]

    async with trio.open_nursery() as nursery:
        for addr in workers:
            nursery.start_soon(one, addr)
    if errors:
        s.uploads.files.pop(filename, None)
    return {"workers": workers, "errors": errors}


async def op_run_function(s: Scheduler, request: dict[str, Any]) -> dict[str, Any]:
    """``run_on_scheduler``: call a function here (``dask_scheduler=`` is this object)."""
    try:
        result = await call_pickled(request["function"], "dask_scheduler", s)
    except Exception as exc:
        blob, tb_blob, text, _ = pack_exception(exc)
        return {"error": [blob, tb_blob, text]}
    return {"result": result}


async def op_worker_lost_reason(s: Scheduler, request: dict[str, Any]) -> None:
    """A nanny says why its worker vanished (the scheduler saw only a broken stream)."""
    logger.warning(
        "worker %s: %s (reported by its nanny)", request.get("worker"), request.get("reason")
    )


async def op_start_ipython(s: Scheduler, request: dict[str, Any]) -> dict[str, Any]:
    """An IPython kernel in this process with ``scheduler`` in its namespace."""
    from trioscheduler.kernels.service import start_ipython_reply

    assert s._nursery is not None
    return await start_ipython_reply(
        s, role="scheduler", address=s.address, directory=None, nursery=s._nursery
    )


async def op_restart(s: Scheduler, request: dict[str, Any]) -> dict[str, Any]:
    """Cancel every client's keys, then restart the workers.

    Workers under a nanny are restarted by it; the others are closed when
    ``close_workers`` (dask's rule: a deployment may bring them back), else left
    alone (the requesting client restarts its own in-process cluster). Waits, up to
    ``timeout``, until every restarted worker joined again.
    """
    timeout = float(request.get("timeout", 60))
    nannies = {addr: ws.nanny for addr, ws in s.state.workers.items() if ws.nanny}
    plain = sorted(addr for addr in s.state.workers if addr not in nannies)
    environment = request.get("environment")  # None: stay in the current one
    if environment is not None:
        try:
            prepare_timeout = float(request.get("prepare_timeout", timeout))
            await _prepare_environment(s, environment, nannies, plain, prepare_timeout)
        except EnvironmentRefusedError as exc:  # nothing was touched
            return {"restarted": [], "plain": plain, "errors": {}, "refused": exc.reasons,
                    "refused_text": str(exc)}  # fmt: skip
    s.datasets.clear()
    s.plugins.call("restart", s)
    # the requester cancels its own futures when we answer
    s._feed(m.CancelAll(s._stimulus("restart"), trio.current_time(), request.get("client", ""), RESTART_REASON))
    if request.get("close_workers", True):
        for addr in plain:
            s._send(s._workers, addr, m.CloseWorker(addr, "restart"))
    new: list[str] = []
    errors: dict[str, str] = {}
    assert s._pool is not None
    pool = s._pool

    async def one(addr: str, nanny: str) -> None:
        try:
            async with pool.connect(nanny) as stream:
                await stream.send({"op": "restart", "reason": "Client.restart"})
                reply = await stream.receive()
        except (OSError, trio.BrokenResourceError, trio.EndOfChannel) as exc:
            reply = {"status": "error", "text": repr(exc)}
        if reply.get("status") == "OK":
            new.append(reply["worker"])
        else:
            errors[addr] = str(reply.get("text"))

    with trio.move_on_after(timeout) as scope:
        async with trio.open_nursery() as nursery:
            for addr, nanny in nannies.items():
                nursery.start_soon(one, addr, nanny)
        while not all(a in s.state.workers for a in new):
            await s._workers_changed.wait()
    if scope.cancelled_caught:
        errors["timeout"] = (
            f"{len([a for a in new if a in s.state.workers])} of {len(nannies)} "
            f"workers were back within {timeout} s"
        )
    return {"restarted": sorted(new), "plain": plain, "errors": errors}


async def op_coord(s: Scheduler, request: dict[str, Any]) -> Any:
    return await s.coordination.answer(request, wait_ok=False)


async def op_coord_wait(s: Scheduler, request: dict[str, Any]) -> Any:
    return await s.coordination.answer(request, wait_ok=True)


async def _prepare_environment(
    s: Scheduler,
    env_id: str,
    nannies: dict[str, str],
    plain: list[str],
    prepare_timeout: float,
) -> None:
    """Phase one of a restart into ``env_id``, with its own budget (the restart's
    ``timeout`` starts after it); on success it becomes the current one."""
    if env_id != "base":
        if not isinstance(env_id, str) or not s.environments.has(env_id):
            raise EnvironmentRefusedError(
                f"the scheduler has no environment {env_id!r:.80}: upload_environment() it first"
            )
        assert s._pool is not None
        await prepare_everywhere(s._pool, nannies, plain, env_id, prepare_timeout)
    # Set before the restart proper: a worker restarting meanwhile starts in it too.
    s.environments.current = None if env_id == "base" else env_id


async def op_env_has(s: Scheduler, request: dict[str, Any]) -> dict[str, Any] | None:
    env_id = request["id"]
    return s.environments.manifests[env_id] if s.environments.has(env_id) else None


async def op_env_put(s: Scheduler, request: dict[str, Any]) -> dict[str, Any] | None:
    async with s._env_lock:
        return await trio.to_thread.run_sync(
            lambda: s.environments.put(
                request["id"], int(request["offset"]), request["data"], bool(request.get("final"))
            )
        )


async def op_env_get(s: Scheduler, request: dict[str, Any]) -> tuple[bytes, int]:
    return await trio.to_thread.run_sync(
        s.environments.read, request["id"], int(request["offset"]), int(request["length"])
    )


async def op_env_current(s: Scheduler, request: dict[str, Any]) -> str | None:
    return s.environments.current


HANDLERS: dict[str, Callable[[Scheduler, dict[str, Any]], Any]] = {
    "identity": op_identity,
    "scheduler_info": op_identity,
    "who_has": op_who_has,
    "has_what": op_has_what,
    "nthreads": op_nthreads,
    "ncores": op_nthreads,
    "wait_for_workers": op_wait_for_workers,
    "update_data": op_update_data,
    "task_states": op_task_states,
    "publish_put": op_publish_put,
    "publish_get": op_publish_get,
    "publish_list": op_publish_list,
    "publish_delete": op_publish_delete,
    "upload_file": op_upload_file,
    "run_function": op_run_function,
    "restart": op_restart,
    "worker_lost_reason": op_worker_lost_reason,
    "start_ipython": op_start_ipython,
    "coord": op_coord,
    "coord_wait": op_coord_wait,
    "env_has": op_env_has,
    "env_put": op_env_put,
    "env_get": op_env_get,
    "env_current": op_env_current,
}
