"""IPython kernels in the scheduler and workers, from a client (``trioscheduler.kernels``).

``Client.start_ipython_scheduler`` / ``start_ipython_workers`` ask the servers for their
kernel's connection info, then do the user's side (magics, qtconsole) in the calling
thread: a sync client's methods return there, an asynchronous one's after the await.
"""

from __future__ import annotations

from typing import Any

import trio

from trioscheduler.client.base import ClientBase
from trioscheduler.client.keys import check_workers
from trioscheduler.kernels import magics as kernel_magics
from trioscheduler.kernels.extra import CLIENT_MODULES, require_ipython

__all__ = ["IPythonMethods", "start_on_scheduler", "start_on_workers"]


async def start_on_scheduler(client: ClientBase) -> dict[str, Any]:
    reply = await client.rpc({"op": "start_ipython"})
    return kernel_magics.info_from_reply(reply, str(client.scheduler_address))


async def start_on_workers(client: ClientBase, workers: list[str] | None) -> dict[str, Any]:
    targets = sorted(await client.rpc({"op": "nthreads", "workers": workers}))
    if workers and not targets:
        raise ValueError(f"no running worker matches workers={workers!r}")
    replies: dict[str, Any] = {}

    async def one(addr: str) -> None:
        try:
            async with client.worker_connection(addr) as stream:
                await stream.send({"op": "start_ipython"})
                reply = await stream.receive()
        except (OSError, trio.BrokenResourceError, trio.EndOfChannel) as exc:
            reply = {"status": "error", "text": f"could not reach {addr}: {exc!r}"}
        replies[addr] = reply.get("result") if reply.get("status") == "OK" else reply

    async with trio.open_nursery() as nursery:
        for addr in targets:
            nursery.start_soon(one, addr)
    return {addr: kernel_magics.info_from_reply(replies[addr], addr) for addr in targets}


class IPythonMethods(ClientBase):
    def start_ipython_scheduler(
        self,
        magic_name: str | None = "scheduler_if_ipython",
        qtconsole: bool = False,
        qtconsole_args: list[str] | None = None,
    ) -> Any:
        """Start an IPython kernel in the scheduler (``scheduler`` and its core ``state``
        in the namespace) and return its connection info; inside IPython, ``%scheduler``
        / ``%%scheduler`` run code there (``magic_name``: another name, or None)."""
        require_ipython("Client.start_ipython_scheduler", CLIENT_MODULES)

        def then(info: dict[str, Any]) -> dict[str, Any]:
            return kernel_magics.on_scheduler_kernel(info, magic_name, qtconsole, qtconsole_args)

        if self.asynchronous:

            async def start() -> dict[str, Any]:
                return then(await start_on_scheduler(self))

            return start()
        return then(self.sync(start_on_scheduler, self))

    def start_ipython_workers(
        self,
        workers: Any = None,
        magic_names: Any = False,
        qtconsole: bool = False,
        qtconsole_args: list[str] | None = None,
    ) -> Any:
        """Start IPython kernels in the workers (``worker`` in the namespace):
        ``{worker address: connection info}``. Inside IPython, ``%remote info[addr] CODE``
        / ``%%remote info[addr]`` run code in one; ``magic_names`` (``'w_*'``, a name or
        a list) adds a magic per worker."""
        require_ipython("Client.start_ipython_workers", CLIENT_MODULES)
        wanted = check_workers(workers)

        def then(infos: dict[str, Any]) -> dict[str, Any]:
            return kernel_magics.on_worker_kernels(infos, magic_names, qtconsole, qtconsole_args)

        if self.asynchronous:

            async def start() -> dict[str, Any]:
                return then(await start_on_workers(self, wanted))

            return start()
        return then(self.sync(start_on_workers, self, wanted))
