"""Batched sending: many small messages to one peer become one write.

Per-message overhead (a system call, a trio schedule point, a msgpack call) is what
limits a Python scheduler, so the shells queue messages with ``send_nowait`` and a
background task writes everything pending every ``interval`` seconds, as dask's
``BatchedSend`` does. Over TCP the whole batch is serialized by one msgpack call; the
receiving stream hands the messages out one by one, in order, so receivers cannot tell
batched from unbatched sends.

``send_nowait`` does not serialize (that is the point): a message that cannot be
serialized is found at flush time, logged and dropped, and the rest of its batch is
still sent. ``await send(msg)`` checks its message first and raises at the call site.
A message that is itself a large buffer or array (``len``/``nbytes`` at least
``large_bytes``) is flushed at once instead of waiting; the check is O(1) because it
runs for every message. Large buffers nested anywhere in a message still travel out of
band: the batch is packed message by message and a message that packs large is split.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import trio

from trioscheduler.core import messages
from trioscheduler.wire.serialize import SerializationError, dumps
from trioscheduler.wire.stream import Stream, logger

#: A message carrying this many bytes flushes the batch without waiting for the interval.
LARGE_BYTES: Final = 256 * 1024
_BUFFERS: Final = frozenset({bytes, bytearray, memoryview})
_NOT_ARRAYS: Final = frozenset({str, int, float, bool, type(None), tuple, list, dict})


def _large(msg: Any, threshold: int) -> bool:
    """Is ``msg`` itself a big buffer or array? O(1): this runs for every message."""
    t = type(msg)
    if t in _BUFFERS:
        return len(msg) >= threshold
    if t in _NOT_ARRAYS or t in messages._FIELDS:
        return False
    nbytes = getattr(msg, "nbytes", None)  # numpy arrays, pandas series
    return type(nbytes) is int and nbytes >= threshold


class BatchedSend:
    """Queue of messages for one stream; made by ``open_batched``."""

    __slots__ = (
        "stream", "interval", "large_bytes", "_pending", "_has_pending", "_urgent",
        "_write_lock", "_error", "_closed", "messages_sent", "batches_sent",
    )  # fmt: skip

    def __init__(self, stream: Stream, interval: float, large_bytes: int) -> None:
        self.stream = stream
        self.interval = interval
        self.large_bytes = large_bytes
        self._pending: list[Any] = []
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
        self._pending.append(msg)
        if not self._has_pending.is_set():
            self._has_pending.set()
        if type(msg) not in _NOT_ARRAYS and _large(msg, self.large_bytes):
            self._urgent.set()

    async def send(self, msg: Any) -> None:
        """Queue ``msg`` and write it (with everything queued before it) now.

        Raises ``SerializationError`` here if ``msg`` cannot be serialized.
        """
        dumps(msg)
        self.send_nowait(msg)
        await self.flush()

    async def flush(self) -> None:
        """Write everything pending, in order."""
        async with self._write_lock:
            if not self._pending:
                return
            batch, self._pending = self._pending, []
            self._has_pending = trio.Event()
            self._urgent = trio.Event()
            try:
                try:
                    await self.stream._send_batch(batch)
                except SerializationError:
                    batch = self._drop_unserializable(batch)
                    await self.stream._send_batch(batch)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                self._error = e
                raise
            self.messages_sent += len(batch)
            self.batches_sent += 1

    def _drop_unserializable(self, batch: list[Any]) -> list[Any]:
        good = []
        for msg in batch:
            try:
                dumps(msg)
            except SerializationError as e:
                logger.error(
                    "dropped a message to %s that cannot be serialized: %s",
                    self.stream.peer_address, e,
                )  # fmt: skip
            else:
                good.append(msg)
        return good

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
