"""The process's one kernel, shared by every server in the process.

A server shell answers a ``start_ipython`` request with ``await start_ipython(self,
...)``: the first request starts the kernel (in a thread: imports and start take a few
hundred ms), later ones only add names. A task in each server's nursery holds the
kernel while that server lives; the last server to close stops it. A kernel a client
shut down remotely has torn itself down; the next request starts a fresh one.

Names in the kernel: ``scheduler`` and ``state`` (its core ``SchedulerState``) where a
scheduler lives, ``workers`` (``{address: Worker}``, kept current) and ``worker`` when
exactly one worker lives in the process, and ``trio``.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from typing import TYPE_CHECKING, Any

import trio

from trioscheduler.kernels.extra import require_ipython

if TYPE_CHECKING:
    from trioscheduler.kernels.thread import KernelHandle

logger = logging.getLogger("trioscheduler.kernels")

_WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def kernel_host(address: str) -> str:
    """The interface to bind a kernel to: the server's own host, loopback for inproc."""
    scheme, _, rest = address.partition("://")
    if scheme not in ("tcp", "tls"):
        return "127.0.0.1"
    host = rest.rsplit(":", 1)[0]
    return host.strip("[]") if host not in _WILDCARDS else "0.0.0.0"


class _ProcessKernel:
    """Bookkeeping of the process's kernel; ``ensure``/``release`` run in threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # one start or stop at a time
        self.handle: KernelHandle | None = None
        self.schedulers: dict[str, Any] = {}
        self.workers: dict[str, Any] = {}  # the dict the kernel's ``workers`` name holds
        self.published_worker: Any = None  # what ``worker`` was set to, if anything

    def names(self) -> dict[str, Any]:
        # copies: the trio thread changes the tables while a starting thread reads them
        ns: dict[str, Any] = {"trio": trio, "workers": self.workers}
        schedulers, workers = list(self.schedulers.values()), list(self.workers.values())
        if schedulers:
            ns["scheduler"], ns["state"] = schedulers[0], schedulers[0].state
        if len(workers) == 1:
            ns["worker"] = workers[0]
        return ns

    def publish_names(self) -> None:
        handle = self.handle
        if handle is not None and handle.alive:
            ns = handle.user_ns
            names = self.names()
            ns.update(names)
            if "worker" not in names and ns.get("worker") is self.published_worker:
                ns.pop("worker", None)  # no longer the one worker of this process
            self.published_worker = names.get("worker")

    def ensure(
        self, host: str, directory: str | None, token: trio.lowlevel.TrioToken
    ) -> dict[str, Any]:
        from trioscheduler.kernels.thread import start_kernel

        with self.lock:
            handle = self.handle
            if handle is not None and not handle.alive:  # shut down by a client, or stuck
                handle.stopped.wait(5)
                if not handle.stopped.is_set():
                    raise RuntimeError(
                        "the previous IPython kernel of this process is still stopping "
                        "(a cell is stuck in C code); try again when it returns"
                    )
                self.handle = handle = None
            if handle is None:
                kernel_dir = tempfile.mkdtemp(prefix="trioscheduler-ipykernel-", dir=directory)
                names = self.names()
                handle = start_kernel(names, host=host, directory=kernel_dir, token=token)
                self.handle = handle
                self.published_worker = names.get("worker")
                logger.info(
                    "IPython kernel listening on %s (messages are signed, not encrypted: "
                    "whoever may call this server can already run code here)",
                    host,
                )
            return handle.connection_info()

    def release(self) -> None:
        """The last server left: stop the kernel (interrupting a running cell)."""
        with self.lock:
            if self.schedulers or self.workers or self.handle is None:
                return
            handle = self.handle
            if handle.stop():
                handle.stopped.wait(5)  # its thread tore the kernel down
                self.handle = None
            else:  # kept: the next start waits for it (or says it is stuck)
                logger.warning(
                    "the IPython kernel's thread is stuck in a cell (in C code); abandoned"
                )


_KERNEL = _ProcessKernel()


async def _hold(role: str, address: str) -> None:
    """Lives in the server's nursery: its end takes the server out of the kernel."""
    try:
        await trio.sleep_forever()
    finally:
        table = _KERNEL.schedulers if role == "scheduler" else _KERNEL.workers
        table.pop(address, None)
        _KERNEL.publish_names()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_KERNEL.release)


async def start_ipython(
    server: Any, *, role: str, address: str, directory: str | None, nursery: trio.Nursery
) -> dict[str, Any]:
    """Connection info of the process's kernel, with ``server`` in its namespace.

    The reply also names the server (``server_address``, ``role``): a client's
    ``%remote`` binds ``worker`` to the targeted one when several share the kernel.
    """
    require_ipython("IPython kernels in the scheduler and workers")
    token = trio.lowlevel.current_trio_token()
    table = _KERNEL.schedulers if role == "scheduler" else _KERNEL.workers
    if address not in table:
        table[address] = server
        nursery.start_soon(_hold, role, address)
    info = await trio.to_thread.run_sync(_KERNEL.ensure, kernel_host(address), directory, token)
    _KERNEL.publish_names()
    return {**info, "server_address": address, "role": role}


async def start_ipython_reply(
    server: Any, *, role: str, address: str, directory: str | None, nursery: trio.Nursery
) -> dict[str, Any]:
    """``start_ipython`` as an RPC result: ``{"info": ...}`` or ``{"error": [type, text]}``
    (the client raises the same type: an ImportError names the extra to install)."""
    try:
        info = await start_ipython(
            server, role=role, address=address, directory=directory, nursery=nursery
        )
    except (ImportError, RuntimeError, TimeoutError, OSError) as exc:
        logger.warning("starting an IPython kernel failed: %s", exc)
        return {"error": [type(exc).__name__, str(exc)]}
    return {"info": info}
