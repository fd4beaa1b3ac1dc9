"""The asynchronous Client under asyncio: its awaitables, answered by a trio loop.

Under trio, ``async with Client(..., asynchronous=True)`` runs the client's session in
the caller's own task tree, and every awaitable is a trio coroutine (unchanged, no
cost). Under asyncio (``asyncio.run``, uvloop, FastAPI, Jupyter, anyio's asyncio
backend) trio's primitives cannot run in the caller's loop, and the whole wire layer,
like the scheduler and the workers, is trio. So the session is held open in the
process-wide background trio loop (``deploy.loop``, the one a sync client uses), and
each awaitable the client hands out is a ``Bridge.call``: the trio coroutine runs as a
task in that loop and its outcome is delivered to the asyncio future the caller
awaits -- two loop-to-loop hand-offs (``TrioToken.run_sync_soon``, then
``loop.call_soon_threadsafe``), no thread started per call.

Cancelling the asyncio side (a timeout, a cancelled request handler) cancels the trio
task. The trio task is a system task of that loop, not a child of the client's
nursery, so ``close()`` itself can be bridged while it cancels the client's tasks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import trio

__all__ = ["Bridge", "current_library"]


def current_library() -> str | None:
    """``"trio"``, ``"asyncio"``... for the running task, or None outside an event loop."""
    import sniffio

    try:
        return sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return None


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():  # cancelled on the asyncio side meanwhile
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class Bridge:
    """Runs trio coroutine functions in the loop of ``token`` for asyncio callers."""

    __slots__ = ("token",)

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self.token = token

    async def call(self, async_fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        scope = trio.CancelScope()

        async def run() -> None:
            try:
                with scope:
                    value = await async_fn(*args)
            except BaseException as exc:
                if isinstance(exc, trio.Cancelled):  # the trio loop itself is ending
                    stopped = RuntimeError("the client's trio loop stopped")
                    try:
                        loop.call_soon_threadsafe(_settle, fut, False, stopped)
                    except RuntimeError:
                        pass
                    raise
                outcome: tuple[bool, Any] = (False, exc)
            else:
                if scope.cancelled_caught:
                    outcome = (False, asyncio.CancelledError())
                else:
                    outcome = (True, value)
            try:
                loop.call_soon_threadsafe(_settle, fut, *outcome)
            except RuntimeError:  # the asyncio loop is closed: nobody waits any more
                pass

        def start() -> None:
            trio.lowlevel.spawn_system_task(run, name=f"asyncio bridge: {async_fn!r:.80}")

        try:
            self.token.run_sync_soon(start)
        except trio.RunFinishedError:
            raise RuntimeError("the client's trio loop has stopped") from None
        try:
            return await fut
        except asyncio.CancelledError:
            try:
                self.token.run_sync_soon(scope.cancel)
            except trio.RunFinishedError:
                pass
            raise
