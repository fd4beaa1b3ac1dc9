"""The client's link to its scheduler: one ordered stream each way, plus requests.

Out: everything the client sends goes through one FIFO, the outbox. ``emit`` (loop
thread only) appends a message, merging adjacent ``UpdateGraph`` and
``ClientReleasesKeys`` messages, and a flusher task writes the outbox to a batched
stream. So a burst of ``submit`` calls becomes one graph, and a release can never
overtake the submit it follows. A release is not urgent: it waits for the next message
(a ``submit`` right after a ``result()`` usually: then the scheduler gets both, and
the worker ``FreeKeys`` and ``ComputeTask``, in one batch), or ``wire.batched.LAZY_DELAY``.

In: the receive loop applies the scheduler's key messages (``KeyInMemory``,
``KeyErred``, ``KeyCancelled``, ``KeyLost``, and a small result just ahead of its
``KeyInMemory``) to the client's futures table.

Requests (``who_has``, ``scatter``'s ``update_data``...) go over pooled connections and
name how many stream messages came before them; the scheduler answers only after
handling those, so a request never overtakes what the client sent earlier.

Leaving (``goodbye``) sends ``RemoveClient``; the scheduler releases every key of this
client and closes the stream, which the receive loop sees before the link's tasks end.

A stream that drops without being asked to is dialled again with back-off for
``reconnect_timeout`` seconds (a scheduler restarting from its log at the same address:
docs/recovery.md). Reconnected, the link says hello with the same client id, sends what
queued up meanwhile, then wants every key it still holds again: the scheduler answers
each with its outcome (or ``KeyCancelled`` for a key it does not know), so pending
futures complete. Only if no scheduler answers in time are the futures cancelled.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import trio

from trioscheduler import wire
from trioscheduler.client.key_table import KeyTable
from trioscheduler.core import messages as m
from trioscheduler.core.scheduler_client_events import graph_first
from trioscheduler.errors import TrioSchedulerError
from trioscheduler.wire.batched import LAZY_DELAY
from trioscheduler.wire.inproc import InprocStream
from trioscheduler.wire.local_alias import local_route

__all__ = ["SchedulerLink"]


class SchedulerValueError(TrioSchedulerError, ValueError):
    """The scheduler refused a request's argument (``ValueError`` there, as dask's)."""


class SchedulerKeyError(TrioSchedulerError, KeyError):
    """The scheduler has no such key or path (``KeyError`` there)."""


class SchedulerTypeError(TrioSchedulerError, TypeError):
    """A request's argument had the wrong type (``TypeError`` there)."""


class SchedulerTimeoutError(TrioSchedulerError, TimeoutError):
    """A request's wait on the scheduler ran out (``TimeoutError`` there)."""


# A request's error is both a TrioSchedulerError and the builtin type dask code catches.
_BUILTIN_ERRORS: dict[Any, type[Exception]] = {
    "ValueError": SchedulerValueError,
    "KeyError": SchedulerKeyError,
    "TypeError": SchedulerTypeError,
    "TimeoutError": SchedulerTimeoutError,
}

logger = logging.getLogger("trioscheduler.client")

MERGE_MAX = 10_000
"""Tasks: adjacent graphs in the outbox merge into one message up to this size."""


class SchedulerLink:
    """One client's stream to the scheduler, its receive loop and request pool."""

    def __init__(
        self,
        client_id: str,
        table: KeyTable,
        *,
        timeout: float,
        batch_interval: float,
        connection_limit: int,
        connect_args: dict[str, Any] | None = None,
        reconnect_timeout: float = 60.0,
    ) -> None:
        if not reconnect_timeout >= 0:
            raise ValueError(f"reconnect_timeout must be >= 0 seconds, not {reconnect_timeout!r}")
        self.reconnect_timeout = reconnect_timeout
        self.reconnections = 0
        self.expect_return = True  # False once the scheduler said it closes for good
        self.client_id = client_id
        self.connect_args = dict(connect_args or {})  # TLS context (Client(security=))
        self.table = table
        self.timeout = timeout
        self.batch_interval = batch_interval
        self.connection_limit = connection_limit
        self.address: str | None = None  # the scheduler's address, as the user gave it
        self.route: str | None = None  # what we connect to: the address or its inproc alias
        self.closing = False
        self.sent = 0  # messages written to the scheduler stream after AddClient
        self._stimulus = 0
        self._outbox: list[Any] = []
        # In ``_flush_outbox``: a scheduler in this run feeds each message inside its send,
        # and what the client does on its answers (a release) may emit meanwhile: that
        # waits in the outbox for the outer flush, which sends it after the rest, in order.
        self._flushing = False
        self._delivering = False  # in ``_deliver``: inside a scheduler's send, in this run
        self._merge_order = 0  # the next free ``order`` of the last graph in the outbox
        self._outbox_ready: trio.Event | None = None
        # Releases wake nobody: they go with the next message, or ``LAZY_DELAY`` after
        # the first of them (the flusher's wait ends then: ``_lazy_at``; armed once, not
        # disarmed by a write: see ``wire.batched``).
        self._lazy_at = math.inf
        self._flusher_wait: trio.CancelScope | None = None  # while the flusher waits
        self._stream: wire.Stream | None = None
        self._batched: wire.BatchedSend | None = None
        self._pool: wire.ConnectionPool | None = None
        self._receive_done: trio.Event | None = None
        # ``Client.subscribe_topic``: called (loop thread) with (topic, [time, msg])
        self.on_event: Callable[[str, Any], None] | None = None
        self.services: dict[str, Any] = {}  # the scheduler's (dashboard port), from its ack

    def stimulus(self, kind: str) -> str:
        self._stimulus += 1
        return f"{kind}-{self._stimulus}"

    # -- opening and closing --------------------------------------------------------------

    async def open(self, stack: AsyncExitStack, address: str, route: str) -> None:
        """Connect to ``route`` (``address`` or its in-process alias), say hello, and
        enter the pool into ``stack``; ``serve`` then runs the stream."""
        self.address, self.route = address, route
        try:
            self._stream = await self._connect()
        except wire.ConnectError as exc:
            raise wire.ConnectError(
                f"Client could not connect to the scheduler at {address} within {self.timeout} s: {exc}"
            ) from exc
        stack.push_async_callback(self._close_stream)
        self._pool = await stack.enter_async_context(
            wire.ConnectionPool(
                self.connection_limit,
                timeout=self.timeout,
                role="client",
                info={"id": self.client_id},
                **self.connect_args,
            )
        )
        self._outbox_ready = trio.Event()
        self._receive_done = trio.Event()

    async def _connect(self) -> wire.Stream:
        """One stream to the scheduler, acknowledged."""
        assert self.route is not None
        stream = await wire.connect(
            self.route,
            timeout=self.timeout,
            role="client",
            info={"id": self.client_id},
            **self.connect_args,
        )
        ack: Any = None
        try:
            with trio.move_on_after(self.timeout):
                try:
                    await stream.send(
                        m.AddClient(
                            self.stimulus("add-client"), trio.current_time(), self.client_id
                        )
                    )
                    ack = await stream.receive()
                except (trio.BrokenResourceError, trio.EndOfChannel) as exc:
                    ack = exc
            if not (isinstance(ack, dict) and ack.get("op") == "stream-start"):
                raise wire.ConnectError(
                    f"the scheduler at {self.address} did not acknowledge the client: {ack!r:.100}"
                )
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise
        services = ack.get("services")
        self.services = services if isinstance(services, dict) else {}
        self.sent = 0  # the scheduler counts this stream's messages from its hello
        return stream

    async def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def serve(
        self, on_lost: Callable[[], None], *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The stream's batched sender, receive loop and flusher (started once the sender
        is up); on a dropped stream, reconnect (``_reconnect``) and go on, or, if no
        scheduler answers in time, ``on_lost()``."""
        assert self._receive_done is not None
        try:
            while True:
                assert self._stream is not None
                async with _tolerant_batched(self._stream, self.batch_interval) as batched:
                    self._batched = batched
                    if self.reconnections:
                        self._reannounce()
                    task_status.started()
                    task_status = trio.TASK_STATUS_IGNORED
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._flusher)
                        await self._receive_loop()
                        nursery.cancel_scope.cancel()
                    self._batched = None  # until reconnected, messages wait in the outbox
                if self.closing:
                    return
                if not await self._reconnect():
                    logger.warning(
                        "client %s: the scheduler at %s closed the connection",
                        self.client_id,
                        self.address,
                    )
                    on_lost()
                    return
        finally:
            self._receive_done.set()

    async def _reconnect(self) -> bool:
        """Dial again with back-off (0.05 s doubling to 2 s, jittered) for
        ``reconnect_timeout`` seconds."""
        if self.reconnect_timeout <= 0 or not self.expect_return:
            return False
        deadline = trio.current_time() + self.reconnect_timeout
        delay = 0.05
        attempts = 0
        logger.warning(
            "client %s lost the scheduler at %s; reconnecting for up to %g s",
            self.client_id, self.address, self.reconnect_timeout,
        )  # fmt: skip
        await self._close_stream()
        while not self.closing:
            left = deadline - trio.current_time()
            if left <= 0:
                return False
            attempts += 1
            assert self.address is not None
            # a scheduler in this trio run has a new in-memory alias each time it starts
            self.route = local_route(self.address)
            try:
                with trio.fail_after(min(left, self.timeout)):
                    self._stream = await self._connect()
                break
            except (OSError, wire.ConnectError, wire.ProtocolError, trio.TooSlowError,
                    trio.BrokenResourceError, trio.EndOfChannel) as exc:  # fmt: skip
                logger.debug("client %s: reconnect attempt %d: %r", self.client_id, attempts, exc)
            await trio.sleep(
                min(delay * random.uniform(0.5, 1.0), max(deadline - trio.current_time(), 0))
            )
            delay = min(delay * 2, 2.0)
        if self.closing:
            return False
        self.reconnections += 1
        logger.warning(
            "client %s reconnected to %s (attempt %d)", self.client_id, self.address, attempts
        )
        return True

    def _reannounce(self) -> None:
        """What queued meanwhile first (new graphs: their keys must be known before they
        are wanted again), then every key still held, each answered with its outcome."""
        held = list(self.table.snapshot())  # (under the table's lock: user threads add keys)
        if held:
            self._outbox.append(
                m.ClientDesiresKeys(
                    self.stimulus("reconnect"), trio.current_time(), self.client_id, held
                )
            )
        try:
            self._flush_outbox()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # lost again: the receive loop sees it and we come back here

    async def goodbye(self) -> None:
        """Send what is queued and ``RemoveClient``; until the scheduler closes the stream
        (or ``timeout``)."""
        self.closing = True
        if self._batched is None:
            return  # no scheduler right now (reconnecting): it drops us after its grace
        with trio.move_on_after(self.timeout):
            try:
                self._flush_outbox()
                assert self._batched is not None
                self._batched.send_nowait(
                    m.RemoveClient(
                        self.stimulus("close-client"), trio.current_time(), self.client_id
                    )
                )
                await self._batched.flush()
                assert self._receive_done is not None
                await self._receive_done.wait()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    # -- out ------------------------------------------------------------------------------

    def emit(self, msg: Any) -> None:
        """Loop thread: queue ``msg`` for the scheduler, merging with the previous one.

        Merged graphs keep their submission order: each later part's ``order`` starts
        after the earlier part's, as separate graphs would run in generation order. A
        graph stops growing at ``MERGE_MAX`` tasks: the scheduler starts on it while the
        next one is on its way, and neither side holds one message of a million tasks.
        """
        if self.closing:
            return
        ob = self._outbox
        t = type(msg)
        if t is m.UpdateGraph:
            if ob and type(ob[-1]) is t and len(ob[-1].tasks) + len(msg.tasks) <= MERGE_MAX:
                last = ob[-1]
                base = self._merge_order
                for spec in msg.tasks:
                    spec.order += base
                last.tasks.extend(msg.tasks)
                last.keys.extend(msg.keys)
            else:
                ob.append(msg)
                base = 0
            if msg.tasks:
                self._merge_order = base + 1 + max(spec.order - base for spec in msg.tasks)
        elif t is m.ClientReleasesKeys:
            if ob and type(ob[-1]) is t:
                ob[-1].keys.extend(msg.keys)
            else:
                ob.append(msg)
            if self._outbox_ready is not None and self._lazy_at == math.inf:
                self._lazy_at = trio.current_time() + max(self.batch_interval, LAZY_DELAY)
                if self._flusher_wait is not None:
                    self._flusher_wait.deadline = self._lazy_at
            return  # (what comes next takes it along; else the flusher, by _lazy_at)
        else:
            ob.append(msg)
        if self._outbox_ready is None:
            return
        batched = self._batched
        if (
            type(batched) is wire.DirectSend
            and not self._outbox_ready.is_set()
            and not self._delivering
            and batched.peer_caught_up()
        ):
            # In memory, a message the scheduler can take at once goes now (the flusher
            # would hand it over one task switch later), with any releases before it.
            # One that finds the last still untaken (a burst of submits in one loop
            # round) waits for the flusher, merging with what follows; so does one sent
            # while the scheduler is delivering to us (it is not to be re-entered).
            try:
                self._flush_outbox()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the receive loop sees the stream end
            return
        self._outbox_ready.set()

    def _flush_outbox(self) -> None:
        batched = self._batched
        if batched is None or self._flushing:
            return  # reconnecting: sent once through (``_reannounce``); or under way
        self._flushing = True
        try:
            while self._outbox:
                msgs, self._outbox = self._outbox, []
                if len(msgs) >= 2:
                    graph_first(msgs)  # (the core says which pairs commute)
                for msg in msgs:
                    batched.send_nowait(msg)
                self.sent += len(msgs)
        finally:
            self._flushing = False

    async def flush(self) -> None:
        """Write everything queued now (a huge ``map`` waits so between batches)."""
        if self.closing or self._batched is None:
            return
        try:
            self._flush_outbox()
            await self._batched.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the receive loop reports a lost scheduler

    async def _flusher(self) -> None:
        last = -float("inf")
        while True:
            assert self._outbox_ready is not None
            with trio.CancelScope(deadline=self._lazy_at) as self._flusher_wait:
                await self._outbox_ready.wait()
            self._flusher_wait = None
            if self._outbox_ready.is_set():
                self._outbox_ready = trio.Event()
            else:  # the releases' timer: the next release arms it again
                self._lazy_at = math.inf
                if not self._outbox:
                    continue
            now = trio.current_time()
            idle, last = now - last >= self.batch_interval, now
            try:
                self._flush_outbox()
                if idle:  # after a quiet spell, write now: batching would only add latency
                    assert self._batched is not None
                    await self._batched.flush()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    # -- requests -------------------------------------------------------------------------

    def worker_connection(self, address: str) -> AbstractAsyncContextManager[wire.Stream]:
        """A pooled connection to ``address`` (a worker's data server)."""
        assert self._pool is not None
        return self._pool.connect(address)

    async def rpc(self, msg: dict[str, Any]) -> Any:
        """One request to the scheduler, answered after everything this client sent on its
        stream before it (``client``/``after``): a request never overtakes a message."""
        assert self._pool is not None and self.route is not None
        if not self.closing:
            self._flush_outbox()
        msg["client"] = self.client_id
        msg["after"] = self.sent
        try:
            async with self._pool.connect(self.route) as stream:
                await stream.send(msg)
                reply = await stream.receive()
        except (
            OSError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.EndOfChannel,
        ) as exc:
            raise TrioSchedulerError(
                f"request {msg.get('op')!r} to the scheduler at {self.address} failed: {exc!r}"
            ) from exc
        if reply.get("status") != "OK":
            # A bad argument comes back as the builtin type the scheduler raised (dask's
            # ValueError/KeyError/TypeError), anything else as a TrioSchedulerError.
            kind = _BUILTIN_ERRORS.get(reply.get("type"), TrioSchedulerError)
            raise kind(f"scheduler: {reply.get('text')}")
        return reply["result"]

    # -- in -------------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        """Apply the scheduler's messages until its stream ends.

        From a scheduler in this trio run (``inproc``), messages are applied as the
        scheduler sends them (``InprocStream.deliver_to``): a result reaches its future
        within the scheduler's own step, not one task switch later. What the channel
        held before is applied first; the stream's end still comes through it.
        """
        stream = self._stream
        assert stream is not None
        dispatch = self._dispatch
        inproc = stream if isinstance(stream, InprocStream) else None
        try:
            if inproc is not None:
                try:
                    while True:
                        dispatch(inproc.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    pass
                inproc.deliver_to(self._deliver)
            async for msg in stream:
                dispatch(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if not self.closing:
                logger.warning("client %s lost its scheduler connection: %r", self.client_id, exc)
        finally:
            if inproc is not None:
                inproc.deliver_to(None)

    def _dispatch(self, msg: Any) -> None:
        handler = self._handlers.get(type(msg))
        if handler is None:
            logger.warning("client %s: unexpected message from the scheduler: %r", self.client_id, msg)
            return
        handler(self, msg)

    def _deliver(self, msg: Any) -> bool:
        """``_dispatch`` in the scheduler's task: an error is this client's, logged, not
        the scheduler's."""
        self._delivering = True
        try:
            self._dispatch(msg)
        except Exception:
            logger.exception("client %s: handling %r failed", self.client_id, msg)
        finally:
            self._delivering = False
        return True

    def _on_key_in_memory(self, msg: m.KeyInMemory) -> None:
        st = self.table.get(msg.key)
        if st is not None:
            st.finish(msg.type_name)

    def _on_key_erred(self, msg: m.KeyErred) -> None:
        st = self.table.get(msg.key)
        if st is not None:
            st.erred(msg.exception, msg.traceback, msg.exception_text)

    def _on_key_cancelled(self, msg: m.KeyCancelled) -> None:
        for st in self.table.drop([msg.key]):
            st.cancel(msg.reason)

    def _on_key_lost(self, msg: m.KeyLost) -> None:
        st = self.table.get(msg.key)
        if st is not None:
            st.lost()

    def _on_value(self, msg: dict[str, Any]) -> None:
        """A small result, just ahead of its ``KeyInMemory``: kept, so no fetch is needed.
        Or an event of a topic this client subscribed to."""
        if msg.get("op") == "event" and self.on_event is not None:
            self.on_event(msg["topic"], msg["event"])
            return
        if msg.get("op") != "value":
            if msg.get("op") == "scheduler-closing":  # stopped in order: back only with a log
                self.expect_return = bool(msg.get("reconnect"))
                return
            if msg.get("op") == "plugin-error":
                from trioscheduler.client.plugins import report_plugin_error

                report_plugin_error(self.client_id, msg)
                return
            logger.warning(
                "client %s: unexpected message from the scheduler: %r", self.client_id, msg
            )
            return
        st = self.table.get(msg["key"])
        if st is not None:
            st.keep(msg["value"])

    _handlers: dict[type[Any], Callable[[SchedulerLink, Any], None]] = {
        m.KeyInMemory: _on_key_in_memory,
        m.KeyErred: _on_key_erred,
        m.KeyCancelled: _on_key_cancelled,
        m.KeyLost: _on_key_lost,
        dict: _on_value,
    }


@asynccontextmanager
async def _tolerant_batched(
    stream: wire.Stream, interval: float
) -> AsyncIterator[wire.BatchedSend]:
    """``open_batched`` whose final flush ignores a stream the scheduler already closed."""
    try:
        async with wire.open_batched(stream, interval, direct=True) as batched:
            yield batched
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
