"""Batched sending: many small messages to one peer become one write.

Per-message overhead (a system call, a scheduler round) is what limits a Python
scheduler, so the shells queue messages with ``send_nowait`` and a background task
writes everything pending every ``interval`` seconds, as dask's ``BatchedSend`` does.
The receiver needs nothing special: a TCP batch is just messages back to back, and
``stream.receive()`` returns them one by one, in order.

Messages are serialized inside ``send_nowait``, so an unserializable message raises
where it was made, and the pending byte count is known: once it reaches
``large_bytes`` the batch goes out at once instead of waiting for the interval.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import trio

from trioscheduler.wire.stream import Stream

#: Pending bytes that flush the batch without waiting for the interval.
LARGE_BYTES: Final = 256 * 1024


class BatchedSend:
    """Queue of encoded messages for one stream; made by ``open_batched``."""

    __slots__ = (
        "stream", "interval", "large_bytes", "_pending", "_pending_bytes", "_has_pending",
        "_urgent", "_write_lock", "_error", "_closed", "messages_sent", "batches_sent",
    )  # fmt: skip

    def __init__(self, stream: Stream, interval: float, large_bytes: int) -> None:
        self.stream = stream
        self.interval = interval
        self.large_bytes = large_bytes
        self._pending: list[Any] = []
        self._pending_bytes = 0
        self._has_pending = trio.Event()
        self._urgent = trio.Event()
        self._write_lock = trio.StrictFIFOLock()
        self._error: BaseException | None = None
        self._closed = False
        self.messages_sent = 0
        self.batches_sent = 0

    def send_nowait(self, msg: Any) -> None:
        """Queue ``msg``; never blocks. Raises if the stream already broke or was closed."""
        if self._error is not None:
            raise trio.BrokenResourceError(
                f"batched stream to {self.stream.peer_address} failed: {self._error}"
            ) from self._error
        if self._closed:
            raise trio.ClosedResourceError("this batched sender was closed")
        encoded, nbytes = self.stream._encode(msg)
        self._pending.append(encoded)
        if not self._has_pending.is_set():
            self._has_pending.set()
        if nbytes:
            self._pending_bytes += nbytes
            if self._pending_bytes >= self.large_bytes and not self._urgent.is_set():
                self._urgent.set()

    async def send(self, msg: Any) -> None:
        """Queue ``msg`` and write it (with everything queued before it) now."""
        self.send_nowait(msg)
        await self.flush()

    async def flush(self) -> None:
        """Write everything pending, in order."""
        async with self._write_lock:
            if not self._pending:
                return
            batch, self._pending, self._pending_bytes = self._pending, [], 0
            self._has_pending = trio.Event()
            self._urgent = trio.Event()
            try:
                await self.stream._send_encoded(batch)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                self._error = e
                raise
            self.messages_sent += len(batch)
            self.batches_sent += 1

    async def _run(self) -> None:
        while True:
            await self._has_pending.wait()
            with trio.move_on_after(self.interval):
                await self._urgent.wait()
            try:
                await self.flush()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # kept in self._error: the next send_nowait raises it


@asynccontextmanager
async def open_batched(
    stream: Stream, interval: float = 0.002, *, large_bytes: int = LARGE_BYTES
) -> AsyncIterator[BatchedSend]:
    """A ``BatchedSend`` on ``stream``; leaving the block writes what is still pending.

    If the block raises, pending messages are dropped (the stream is about to go).
    """
    batched = BatchedSend(stream, interval, large_bytes)
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batched._run)  # never raises: failures are kept for send_nowait
        try:
            yield batched
            await batched.flush()
        except BaseException as e:
            error = e  # re-raised below, outside the nursery: no ExceptionGroup around it
        finally:
            batched._closed = True
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error
