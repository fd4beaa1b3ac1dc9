"""An asyncio event loop in a thread of its own, awaitable from trio.

asyncssh is an asyncio library. Rather than a compatibility layer that runs asyncio
inside trio (trio-asyncio, a further dependency with its own loop rules), the SSH code
runs on a plain asyncio loop in a daemon thread, and trio awaits each coroutine there:
``await bridge.call(async_fn, *args)``. The two loops share nothing but the futures that
cross between them, so neither has to know about the other, and a trio cancellation
cancels the asyncio task it was waiting for.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class AsyncioThread:
    """``async with AsyncioThread() as bridge: await bridge.call(fn, *args)``."""

    def __init__(self, name: str = "trioscheduler-asyncio") -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def __aenter__(self) -> AsyncioThread:
        ready = threading.Event()
        loop = asyncio.new_event_loop()

        def main() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:
                loop.close()

        self.loop = loop
        self._thread = threading.Thread(target=main, name=self.name, daemon=True)
        self._thread.start()
        await trio.to_thread.run_sync(ready.wait)
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        loop, thread = self.loop, self._thread
        if loop is None or thread is None:
            return

        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with trio.CancelScope(shield=True):
            try:
                await self.call(cancel_rest)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                await trio.to_thread.run_sync(thread.join)
        self.loop = None

    async def call(self, async_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``async_fn(*args)`` on the asyncio loop; its result or exception is ours."""
        if self.loop is None:
            raise RuntimeError("the asyncio thread is not running")
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        async def wrapped() -> T:
            return await async_fn(*args)

        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(
            wrapped(), self.loop
        )

        def wake(_: object) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        future.add_done_callback(wake)
        try:
            await done.wait()
        except trio.Cancelled:
            future.cancel()  # cancels the asyncio task too
            raise
        return future.result()
