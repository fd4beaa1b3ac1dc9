"""Administration of the cluster from a client: functions run on the scheduler,
uploaded files, shipped environments, restart, who holds what, waiting for workers.

``Client``'s methods of the same names are thin: they check their arguments, then run
these coroutines on the client's loop (``client.sync``). Everything here goes through
the client's public interface (``rpc``, ``futures``, ``cluster``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cloudpickle
import trio

from trioscheduler.client import transfer as _transfer
from trioscheduler.client.base import ClientBase
from trioscheduler.client.collections import futures_of as collection_futures
from trioscheduler.client.keys import check_workers
from trioscheduler.core.errors import RESTART_REASON
from trioscheduler.environments import EnvironmentRefusedError
from trioscheduler.environments import transfer as env_transfer
from trioscheduler.errors import TrioSchedulerError
from trioscheduler.server import uploads as _upload
from trioscheduler.wire.remote_error import unpack_exception

__all__ = [
    "AdminMethods",
    "restart",
    "run_on_scheduler",
    "upload_environment",
    "upload_file",
    "wait_for_workers",
    "who_has",
]


async def run_on_scheduler(client: ClientBase, payload: bytes) -> Any:
    reply = await client.rpc({"op": "run_function", "function": payload})
    if "error" in reply:
        raise unpack_exception(*reply["error"])
    return reply["result"]


async def upload_file(
    client: ClientBase, name: str, data: bytes, load: bool = True
) -> dict[str, Any]:
    reply = await client.rpc({"op": "upload_file", "filename": name, "data": data, "load": load})
    errors: dict[str, list[Any]] = reply["errors"]
    if errors:
        first: BaseException | None = None
        lines = []
        for worker, (blob, tb_blob, text) in sorted(errors.items()):
            lines.append(f"  {worker}: {text}")
            if first is None and blob is not None:
                first = unpack_exception(blob, tb_blob or b"", text)
        exc = first if first is not None else TrioSchedulerError(f"upload_file({name!r}) failed")
        exc.add_note(
            f"upload_file({name!r}) failed on {len(errors)} of {len(reply['workers'])} "
            "workers (they keep running; the file was not kept):\n" + "\n".join(lines)
        )
        raise exc
    return {w: "OK" for w in reply["workers"]}


async def upload_environment(client: ClientBase, path: Any) -> str:
    return await env_transfer.upload_path(client.rpc, path)


async def restart(
    client: ClientBase,
    timeout: float,  # noqa: ASYNC109
    wait_for_workers: bool,
    environment: Any = None,
    prepare_timeout: float = env_transfer.PREPARE_TIMEOUT,
) -> None:
    cluster = client.cluster
    in_process = cluster is not None and getattr(cluster, "processes", True) is False
    prepare_left = 0.0  # what remains of prepare_timeout for the nannies
    if environment is not None:
        start = trio.current_time()
        if not env_transfer.is_environment_id(environment):
            with trio.move_on_after(prepare_timeout) as uploading:
                environment = await upload_environment(client, environment)
            if uploading.cancelled_caught:
                raise TimeoutError(
                    f"restart(environment=...): uploading the environment took longer than "
                    f"prepare_timeout={prepare_timeout} s; no worker was restarted"
                )
        prepare_left = max(0.0, prepare_timeout - (trio.current_time() - start))
    with trio.fail_after(timeout + prepare_left):
        n_before = len(await client.rpc({"op": "nthreads"}))
        held = client.futures.snapshot()
        reply = await client.rpc(
            {
                "op": "restart",
                "timeout": timeout,
                "close_workers": not in_process,
                "environment": environment,
                "prepare_timeout": prepare_left,
            }  # fmt: skip
        )
        if reply.get("refused") is not None:  # nothing was touched
            raise EnvironmentRefusedError(reply["refused_text"], reply["refused"])
        # Our keys were released without a message each (a late KeyCancelled could
        # cancel a future submitted again after the restart): cancel them here.
        client.futures.drop_unchanged(held)
        for st in held.values():
            st.cancel(RESTART_REASON)
        if in_process and reply["plain"]:
            n = len(cluster.workers)
            await cluster.scale_to(0)
            await cluster.scale_to(n)
        if reply["errors"]:
            raise TrioSchedulerError(
                "restart: "
                + "; ".join(f"{w}: {text}" for w, text in sorted(reply["errors"].items()))
            )
        if wait_for_workers:
            expected = n_before if in_process or not reply["plain"] else len(reply["restarted"])
            await client.rpc({"op": "wait_for_workers", "n_workers": expected})


async def who_has(client: ClientBase, keys: list[Any] | None) -> dict[Any, list[str]]:
    return {k: v for k, v in await client.rpc({"op": "who_has", "keys": keys})}


async def wait_for_workers(client: ClientBase, n_workers: int, timeout: float | None) -> None:  # noqa: ASYNC109
    with trio.move_on_after(float("inf") if timeout is None else timeout):
        await client.rpc({"op": "wait_for_workers", "n_workers": n_workers})
        return
    raise TimeoutError(
        f"only {len(await client.rpc({'op': 'nthreads'}))} of {n_workers} workers "
        f"joined the scheduler at {client.scheduler_address} within {timeout} s"
    )


class AdminMethods(ClientBase):
    """``Client`` methods that administer the cluster (mixed into ``Client``)."""

    # -- functions on every worker ---------------------------------------------------------

    def run(
        self,
        function: Callable[..., Any],
        *args: Any,
        workers: Any = None,
        on_error: str = "raise",
        **kwargs: Any,
    ) -> Any:
        """``function(*args, **kwargs)`` on each worker (or ``workers=``), outside the task
        system: ``{worker address: result}``. A function that takes ``dask_worker=`` gets
        the ``Worker``. ``on_error``: ``"raise"`` the first failure (original type),
        ``"return"`` the exception as that worker's result, or ``"ignore"`` (left out)."""
        if on_error not in ("raise", "return", "ignore"):
            raise ValueError(f"on_error= takes 'raise', 'return' or 'ignore', got {on_error!r}")
        payload = cloudpickle.dumps((function, args, kwargs), protocol=5)
        return self.sync(_transfer.run_on_workers, self, payload, check_workers(workers), on_error)

    def run_on_scheduler(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)`` in the scheduler's process (on its trio loop, so
        keep it short); one that takes ``dask_scheduler=`` gets the ``Scheduler``."""
        payload = cloudpickle.dumps((function, args, kwargs), protocol=5)
        return self.sync(run_on_scheduler, self, payload)

    def upload_file(self, filename: str, load: bool = True) -> Any:
        """Make a ``.py``, ``.zip`` or ``.egg`` file importable on every worker.

        Installed (and, with ``load=True``, imported) on the workers now, and on every
        worker that joins or restarts later. A file that fails to import on any worker
        raises that error (original type, e.g. ``SyntaxError``) with every worker's error
        in its notes; the workers keep running and the file is not kept. With
        ``load=False`` nothing is imported at upload: a task's ``import`` reads the file.
        """
        name, data = _upload.read_upload(filename)
        return self.sync(upload_file, self, name, data, load)

    # -- restart ----------------------------------------------------------------------------

    def restart(
        self,
        timeout: float = 60.0,
        wait_for_workers: bool = True,
        environment: Any = None,
        prepare_timeout: float = env_transfer.PREPARE_TIMEOUT,
    ) -> Any:
        """Restart every worker and cancel every future of every client.

        Nannies restart their worker processes; an in-process ``LocalCluster`` of this
        client gets new workers; other workers without a nanny are closed (a deployment
        may bring them back). Futures end ``cancelled``, their error saying the cluster
        was restarted. Published datasets are dropped.

        ``environment``: a venv directory or archive (uploaded first, see
        ``upload_environment``), an environment id, or ``"base"`` (each nanny's own
        interpreter); None stays in the current one. The scheduler remembers it: workers
        restarted after a crash and workers joining later start in it too. Every nanny
        prepares it first; if any cannot, ``EnvironmentRefusedError`` names each
        worker's reason and no worker stopped.

        Two budgets: ``prepare_timeout`` (default 600 s) for uploading the environment
        and for every nanny to fetch, extract and check it, which can take a while for a
        big environment on a slow link, while the workers keep running; then
        ``timeout`` for the restart proper, until the workers are back.
        """
        return self.sync(restart, self, timeout, wait_for_workers, environment, prepare_timeout)

    def upload_environment(self, path: Any, zipfile: Any = None) -> Any:
        """Send a Python environment to the cluster; returns its id (the archive's sha256).

        ``path``: a venv (or conda-pack style prefix) directory, packed on the fly, or an
        archive made by ``trioscheduler pack-env``. dask 1.13's ``upload_environment(name,
        zipfile)`` is accepted too (the id names it, so the name is not needed). Then
        ``restart(environment=id)`` moves every worker into it.
        """
        return self.sync(upload_environment, self, path if zipfile is None else zipfile)

    # -- cluster information ----------------------------------------------------------

    def scheduler_info(self) -> Any:
        """``{"type", "address", "workers": {address: {name, nthreads, memory_limit, ...}}}``."""
        return self.sync(self.rpc, {"op": "scheduler_info"})

    def who_has(self, futures: Any = None) -> Any:
        """``{key: [worker addresses]}`` for ``futures`` (all keys if None)."""
        # futures, or collections holding them (a persisted dask collection), as dask
        keys = (
            None
            if futures is None
            else list(dict.fromkeys(f.key for f in collection_futures(futures)))
        )
        return self.sync(who_has, self, keys)

    def has_what(self, workers: Any = None) -> Any:
        """``{worker address: [keys]}``."""
        return self.sync(self.rpc, {"op": "has_what", "workers": check_workers(workers)})

    def nthreads(self, workers: Any = None) -> Any:
        """``{worker address: threads}`` of running workers."""
        return self.sync(self.rpc, {"op": "nthreads", "workers": check_workers(workers)})

    ncores = nthreads

    def wait_for_workers(self, n_workers: int = 1, timeout: float | None = None) -> Any:
        """Until at least ``n_workers`` workers are connected (``TimeoutError`` after ``timeout``)."""
        if not isinstance(n_workers, int) or n_workers < 0:
            raise ValueError(f"n_workers must be a non-negative integer, got {n_workers!r}")
        return self.sync(wait_for_workers, self, n_workers, timeout)
