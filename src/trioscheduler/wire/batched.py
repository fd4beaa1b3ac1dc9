"""Batched sending: many small messages to one peer become one write.

Per-message overhead (a system call, a trio schedule point, a msgpack call) is what
limits a Python scheduler, so the shells queue messages with ``send_nowait`` and a
background task writes them. The writer wakes for the first message, lets the other
tasks run once (one schedule point) so that everything produced in the same loop
iteration joins the batch, and writes: a request or a reply pays no batching delay,
even soon after another write (so a request/reply ping-pong is not slowed to one hop
per ``interval`` as with dask's rule). Only a burst waits: once the last two gaps
between writes were both shorter than ``interval * QUIET_FRACTION``, or the last batch
held ``BURST_MESSAGES`` or more, the writer waits until ``interval`` after its last
write and writes everything queued meanwhile, and goes on doing so while those waits
catch more than one message. ``interval=0`` is pure natural batching. A message
queued with ``send_later`` (a report nothing waits on) wakes nobody: it goes with the
next write, or ``LAZY_DELAY`` (at least ``interval``) after it was queued at the latest.
That timer is armed once and not disarmed by a write (a trio deadline set and reset
cost ~10 us, more than the rest of a small write): it may wake the writer once per
``LAZY_DELAY`` for nothing. Over TCP a batch
is one message (``serialize.dumps_batch``); the receiving stream hands the messages out
one by one, in order, so receivers cannot tell batched from unbatched sends.

``send_nowait`` does not serialize (that is the point): a message that cannot be
serialized is found at flush time, logged and dropped, and the rest of its batch is
still sent. ``await send(msg)`` checks its message first and raises at the call site.
A message that is itself a large buffer or array (``len``/``nbytes`` at least
``large_bytes``) is flushed at once instead of waiting; the check is O(1) because it
runs for every message. Large buffers nested anywhere in a message still travel out of
band: a batch that pickles to ``serialize.PICKLED_BATCH_MAX`` or more with a large string
in it is packed with msgpack message by message, and a message that packs large is
split.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import trio

from trioscheduler.core import messages
from trioscheduler.wire._nursery import background_nursery
from trioscheduler.wire.inproc import InprocStream
from trioscheduler.wire.serialize import SerializationError, dumps
from trioscheduler.wire.stream import Stream, logger

#: A message carrying this many bytes flushes the batch without waiting for the interval.
LARGE_BYTES: Final = 256 * 1024
#: After a batch of this many messages (a burst) the next write waits for ``interval``.
BURST_MESSAGES: Final = 16
#: Two gaps in a row between writes shorter than this fraction of ``interval`` mean a
#: stream of messages, not a request/reply pair: coalesce until ``interval`` after the
#: last write.
QUIET_FRACTION: Final = 0.25
#: A ``send_later`` message waits at most this long (or ``interval``, if longer).
LAZY_DELAY: Final = 0.05
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
    """Queue of messages for one stream; made by ``open_batched``.

    The writer task writes a batch one schedule point after its first message arrives,
    unless messages are coming in a burst (see the module docstring); then it waits
    until ``interval`` after the last write (or until a large message arrives) and
    writes everything queued meanwhile.
    """

    __slots__ = (
        "stream", "interval", "large_bytes", "_pending", "_has_pending", "_woken", "_urgent",
        "_next_write", "_last_batch", "_last_gap", "_write_lock", "_error", "_closed",
        "_lazy_at", "_idle_scope", "_holding", "_owed", "messages_sent", "batches_sent",
    )  # fmt: skip

    def __init__(self, stream: Stream, interval: float, large_bytes: int) -> None:
        self.stream = stream
        self.interval = interval
        self.large_bytes = large_bytes
        # Invariants (a flush swaps all of them): _woken is whether _has_pending is set,
        # which it is exactly when _pending holds a message of send_nowait; _pending holding
        # only send_later's messages has _lazy_at finite (the writer wakes by then).
        self._pending: list[Any] = []
        self._has_pending = trio.Event()
        self._woken = False
        self._lazy_at = math.inf
        self._idle_scope: trio.CancelScope | None = None  # the writer's wait, while it waits
        self._holding = False  # between hold() and unhold(): a first message wakes nobody
        self._owed = False  # ... and the writer is owed that wake-up, unless a flush came
        self._urgent = trio.Event()  # a large message is pending: write without waiting
        self._next_write = -math.inf  # the last write started at _next_write - interval
        self._last_batch = 0  # messages in the last write
        self._last_gap = math.inf  # time between the last two writes
        self._write_lock = trio.StrictFIFOLock()
        self._error: BaseException | None = None
        self._closed = False
        self.messages_sent = 0
        self.batches_sent = 0

    @property
    def pending(self) -> int:
        """Messages queued and not yet written."""
        return len(self._pending)

    def send_nowait(self, msg: Any) -> None:
        """Queue ``msg``; never blocks. Raises if the stream already broke or was closed."""
        if self._error is not None or self._closed:
            self._raise_unusable()
        self._pending.append(msg)
        if not self._woken:  # the first of a batch: wake the writer
            if self._holding:
                self._owed = True
            else:
                self._woken = True
                self._has_pending.set()
        if type(msg) not in _NOT_ARRAYS and _large(msg, self.large_bytes):
            self._urgent.set()

    @property
    def holding(self) -> bool:
        """Between ``hold`` and ``unhold``."""
        return self._holding

    def hold(self) -> None:
        """Until ``unhold``, queued messages do not wake the writer: the caller is about
        to ``flush`` them itself (a wake-up would find nothing left to write)."""
        self._holding = True

    def unhold(self) -> None:
        """End ``hold``: whatever is still queued wakes the writer as usual."""
        self._holding = False
        if self._owed:
            self._owed = False
            if not self._woken:
                self._woken = True
                self._has_pending.set()

    def send_later(self, msg: Any) -> None:
        """Queue ``msg`` without waking the writer: it goes with the next write, and
        ``interval`` from now at the latest. For reports nothing waits on; order kept."""
        if self._error is not None or self._closed:
            self._raise_unusable()
        self._pending.append(msg)
        self._arm_lazy()

    def unhold_later(self) -> None:
        """End ``hold`` as if what was queued meanwhile had come by ``send_later``: it
        goes with the next write, ``LAZY_DELAY`` from now at the latest; nobody wakes now."""
        self._holding = False
        if self._owed:
            self._owed = False
            self._arm_lazy()

    def _arm_lazy(self) -> None:
        if self._woken or self._lazy_at != math.inf:
            return  # a write is due already
        self._lazy_at = trio.current_time() + max(self.interval, LAZY_DELAY)
        scope = self._idle_scope
        if scope is not None:
            scope.deadline = self._lazy_at

    def _raise_unusable(self) -> None:
        if self._error is not None:
            raise trio.BrokenResourceError(
                f"batched stream to {self.stream.peer_address} failed: {self._error}"
            ) from self._error
        raise trio.ClosedResourceError("this batched sender was closed")

    async def send(self, msg: Any) -> None:
        """Queue ``msg`` and write it (with everything queued before it) now.

        Raises ``SerializationError`` here if ``msg`` cannot be serialized.
        """
        dumps(msg)
        self.send_nowait(msg)
        await self.flush()

    async def flush(self) -> None:
        """Write everything pending, in order.

        The lock is taken without a schedule point when nobody holds it (``async with``
        would yield once first: one more loop round before every write)."""
        lock = self._write_lock
        if lock.locked():
            await lock.acquire()
        else:
            lock.acquire_nowait()
        try:
            await self._write_pending()
        finally:
            lock.release()

    def flush_nowait(self) -> bool:
        """Write everything pending now, without a schedule point, if no write is under
        way and the stream can (``TCPStream.send_batch_nowait``); else (or if the socket
        took only part of it) wake the writer to finish. True if it was all written."""
        if not self._pending:
            return True
        nowait = getattr(self.stream, "send_batch_nowait", None)
        if nowait is None or self._write_lock.locked():
            self._wake_writer()
            return False
        batch = self._pending
        try:
            went = nowait(batch)
        except SerializationError:
            went = False  # the writer drops what cannot be serialized
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._error = e
            raise
        if not went:
            self._wake_writer()
            return False
        self._take_pending()
        self.messages_sent += len(batch)
        self.batches_sent += 1
        if self.stream.unsent:  # type: ignore[attr-defined]
            self._wake_writer()
            return False
        return True

    def _wake_writer(self) -> None:
        self._owed = False
        if not self._woken:
            self._woken = True
            self._has_pending.set()

    def _unsent(self) -> bool:
        return bool(getattr(self.stream, "unsent", None))

    def _take_pending(self) -> list[Any]:
        """The batch to write now, with the bookkeeping of a write."""
        batch, self._pending = self._pending, []
        self._owed = False
        if self._woken:
            self._has_pending = trio.Event()
            self._woken = False
        if self._urgent.is_set():
            self._urgent = trio.Event()
        now = trio.current_time()
        self._last_gap = now - (self._next_write - self.interval)
        self._next_write = now + self.interval
        self._last_batch = len(batch)
        return batch

    async def _write_pending(self) -> None:
        if not self._pending:
            if self._unsent():  # the rest of a flush_nowait
                try:
                    await self.stream.send_unsent()  # type: ignore[attr-defined]
                except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                    self._error = e
                    raise
            return
        batch = self._take_pending()
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
        burst = False  # the last write came out of a coalescing wait that caught a burst
        while True:
            with trio.CancelScope(deadline=self._lazy_at) as self._idle_scope:
                await self._has_pending.wait()
            self._idle_scope = None
            if not self._woken:  # the send_later timer: the next one arms it again
                self._lazy_at = math.inf
            if not self._pending and not self._unsent():
                continue  # written meanwhile (``flush``): no schedule point, no write
            # One schedule point: whatever the other tasks produce in this loop
            # iteration joins the batch (trio runs them all before we run again).
            await trio.lowlevel.checkpoint()
            now = trio.current_time()
            last = self._next_write - self.interval  # when the last write started
            quick = self.interval * QUIET_FRACTION
            coalesce = now < self._next_write and (
                burst
                or self._last_batch >= BURST_MESSAGES
                or (now - last < quick and self._last_gap < quick)
            )
            if coalesce:
                with trio.move_on_at(self._next_write):
                    await self._urgent.wait()
            try:
                await self.flush()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # kept in self._error: the next send_nowait raises it
            burst = coalesce and self._last_batch > 1


class DirectSend(BatchedSend):
    """``BatchedSend`` for an ``inproc://`` stream: a message goes to the peer at once.

    In memory a batch saves nothing (no system call, no encoding), while the writer's
    wake-up and schedule point would hold every message back two loop rounds. So
    ``send_nowait`` puts the message straight into the peer's channel, or hands it to
    the peer's reader if that takes messages as they are sent (``InprocStream.deliver_to``);
    only while the channel is full do messages queue (in order) for the writer, as in
    ``BatchedSend``.
    """

    __slots__ = ("_put", "_channel", "_stream")

    def __init__(self, stream: InprocStream, interval: float, large_bytes: int) -> None:
        super().__init__(stream, interval, large_bytes)
        self._put = stream._send.send_nowait
        self._channel = stream._send
        self._stream = stream

    def peer_caught_up(self) -> bool:
        """Has the peer taken every message sent so far? (If not, it will take what is
        sent next in the same go: a sender may as well merge it with what follows.)"""
        return not self._pending and self._channel.statistics().current_buffer_used == 0

    def send_nowait(self, msg: Any) -> None:
        if not self._pending and self._error is None and not self._closed:
            deliver = self._stream.peer_delivery()
            if deliver is not None and deliver(msg):  # taken here and now (``deliver_to``)
                self.messages_sent += 1
                self.batches_sent += 1
                return
            try:
                self._put(msg)
            except trio.WouldBlock:
                pass  # full: queue it for the writer, behind nothing
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                self._error = e
                self._raise_unusable()
            else:
                self.messages_sent += 1
                self.batches_sent += 1
                return
        super().send_nowait(msg)

    def send_later(self, msg: Any) -> None:
        self.send_nowait(msg)  # in memory a batch saves nothing: no reason to wait


@asynccontextmanager
async def open_batched(
    stream: Stream,
    interval: float = 0.002,
    *,
    large_bytes: int = LARGE_BYTES,
    direct: bool = False,
) -> AsyncIterator[BatchedSend]:
    """A ``BatchedSend`` on ``stream``; leaving the block writes what is still pending.

    ``direct``: on an ``inproc://`` stream, a ``DirectSend`` (no batching, no delay).
    If the block raises, pending messages are dropped (the stream is about to go) and
    the exception comes out as it is, also when an enclosing scope was cancelled.
    """
    if direct and isinstance(stream, InprocStream):
        batched: BatchedSend = DirectSend(stream, interval, large_bytes)
    else:
        batched = BatchedSend(stream, interval, large_bytes)
    async with background_nursery() as nursery:
        nursery.start_soon(batched._run)  # never raises: failures are kept for send_nowait
        try:
            yield batched
            await batched.flush()
        finally:
            batched._closed = True
