"""Events and topics, and logging forwarded from worker tasks to the client.

``log_event`` records a message under a topic on the scheduler (workers do the same with
``Worker.log_event``, and ``trioscheduler.print``/``warn`` inside tasks); ``get_events``
reads them back; ``subscribe_topic`` has the scheduler push each new event of a topic to
this client, whose handlers run one at a time, in order, in a dispatcher task (a sync
handler in a thread, so it may call the client's blocking methods). ``forward_logging``
installs a log handler on every worker that turns records emitted inside tasks into
events of a topic, and re-emits them here through the same logger names.
"""

from __future__ import annotations

import inspect
import logging
import traceback
from collections.abc import Callable
from typing import Any

import trio

from trioscheduler.client.base import ClientBase
from trioscheduler.client.compat import handle_print, handle_warn
from trioscheduler.errors import TrioSchedulerError
from trioscheduler.server import task_context

__all__ = ["EventMethods"]

logger = logging.getLogger("trioscheduler.client")

FORWARDED_LOG_PREFIX = "forward-logging"  # dask's topic prefix for forwarded records


def _topic_for(logger_name: str | None) -> str:
    return f"{FORWARDED_LOG_PREFIX}-{logger_name or '<root>'}"


class _ForwardingHandler(logging.Handler):
    """On a worker: records emitted inside a task become events of ``topic``."""

    def __init__(self, topic: str, level: int) -> None:
        super().__init__(level)
        self.topic = topic

    def emit(self, record: logging.LogRecord) -> None:
        worker = task_context.current_worker.get()
        if worker is None:  # not inside a task: the worker's own logging stays local
            return
        try:
            attrs = dict(record.__dict__)
            attrs["msg"] = record.getMessage()
            attrs["args"] = None
            if record.exc_info:
                attrs["exc_text"] = "".join(traceback.format_exception(*record.exc_info))
            attrs["exc_info"] = None
            for k, v in list(attrs.items()):
                if not isinstance(v, (str, int, float, bool, type(None))):
                    attrs[k] = repr(v)
            worker.log_event(self.topic, attrs)
        except Exception:
            self.handleError(record)


def _install_forwarder(logger_name: str | None, level: int, topic: str) -> bool:
    """Run on each worker (``client.run``): one forwarding handler per topic."""
    log = logging.getLogger(logger_name)
    for h in list(log.handlers):
        if isinstance(h, _ForwardingHandler) and h.topic == topic:
            log.removeHandler(h)
    log.addHandler(_ForwardingHandler(topic, level))
    return True


def _remove_forwarder(logger_name: str | None, topic: str) -> bool:
    log = logging.getLogger(logger_name)
    found = False
    for h in list(log.handlers):
        if isinstance(h, _ForwardingHandler) and h.topic == topic:
            log.removeHandler(h)
            found = True
    return found


def _emit_forwarded(event: tuple[float, dict[str, Any]]) -> None:
    _, attrs = event
    record = logging.makeLogRecord(attrs)
    logging.getLogger(record.name).handle(record)


class EventMethods(ClientBase):
    """``Client`` methods for events, topics and forwarded logging (mixed into ``Client``)."""

    _topic_handlers: dict[str, Callable[..., Any]]
    _event_send: trio.MemorySendChannel[tuple[str, Any]] | None = None

    def log_event(self, topic: str | list[str], msg: Any) -> Any:
        """Record ``msg`` (anything picklable) under ``topic`` (or each of a list) on the
        scheduler, with the time; subscribers of the topic get it pushed."""
        _check_topic(topic)
        topics = topic if isinstance(topic, str) else list(topic)
        return self.sync(self.rpc, {"op": "log_event", "topic": topics, "msg": msg})

    def get_events(self, topic: str | None = None) -> Any:
        """``((time, msg), ...)`` of ``topic``, or ``{topic: ((time, msg), ...)}`` for all."""
        return self.sync(self._get_events, topic)

    async def _get_events(self, topic: str | None) -> Any:
        got = await self.rpc({"op": "events", "topic": topic})
        if topic is not None:
            return tuple(tuple(e) for e in got)
        return {t: tuple(tuple(e) for e in events) for t, events in got.items()}

    def subscribe_topic(self, topic: str, handler: Callable[..., Any]) -> Any:
        """Call ``handler((time, msg))`` for each new event of ``topic``, in order. A plain
        function runs in a thread (it may block or call the client), an ``async def``
        one in the client's loop. A later subscription to the topic replaces it."""
        if not isinstance(topic, str) or not topic:
            raise TypeError(f"subscribe_topic needs a topic name (a string), got {topic!r}")
        if not callable(handler):
            raise TypeError(f"subscribe_topic needs a callable handler, got {handler!r}")
        return self.sync(self._subscribe_topic, topic, handler)

    def _session_started(self) -> None:
        """Events pushed by the scheduler go to a dispatcher task; ``print``/``warn``
        from tasks are repeated here by default (dask's clients do the same)."""
        super()._session_started()
        assert self._nursery is not None
        self._topic_handlers = {"print": handle_print, "warn": handle_warn}
        send, receive = trio.open_memory_channel[tuple[str, Any]](float("inf"))
        self._event_send = send
        self._link.on_event = self._on_event
        self._nursery.start_soon(self._dispatch_events, receive)

    async def _subscribe_topic(self, topic: str, handler: Callable[..., Any]) -> None:
        if self._event_send is None:
            raise TrioSchedulerError(f"{self!r} is not running")
        self._topic_handlers[topic] = handler
        await self.rpc({"op": "subscribe_topic", "topic": topic})

    def unsubscribe_topic(self, topic: str) -> Any:
        """Stop calling the handler of ``topic``; ``ValueError`` if there is none."""
        handlers = self.__dict__.get("_topic_handlers", {})
        if topic not in handlers or topic in ("print", "warn"):
            raise ValueError(f"no event handler known for topic {topic!r}")
        del handlers[topic]
        return self.sync(self.rpc, {"op": "unsubscribe_topic", "topic": topic})

    def _on_event(self, topic: str, event: Any) -> None:  # loop thread
        if self._event_send is not None:
            self._event_send.send_nowait((topic, event))

    async def _dispatch_events(self, receive: trio.MemoryReceiveChannel[tuple[str, Any]]) -> None:
        async for topic, event in receive:
            handler = self.__dict__.get("_topic_handlers", {}).get(topic)
            if handler is None:
                continue
            try:
                if inspect.iscoroutinefunction(handler):
                    await handler(tuple(event))
                else:
                    await trio.to_thread.run_sync(handler, tuple(event))
            except Exception:
                logger.exception("handler %r of topic %r failed", handler, topic)

    # -- logging from worker tasks ---------------------------------------------------

    def forward_logging(self, logger_name: str | None = None, level: int = logging.NOTSET) -> Any:
        """Records of ``logger_name`` (the root logger by default) and its children
        emitted inside tasks on the workers (at ``level`` or above) are emitted again
        here, through the logger of the same name. For the workers running now."""
        topic = _topic_for(logger_name)
        self.subscribe_topic(topic, _emit_forwarded)
        run = getattr(self, "run")  # noqa: B009 - AdminMethods.run, on the same Client
        return run(_install_forwarder, logger_name, level, topic)

    def unforward_logging(self, logger_name: str | None = None) -> Any:
        """Stop ``forward_logging(logger_name)``."""
        topic = _topic_for(logger_name)
        if topic in self.__dict__.get("_topic_handlers", {}):
            self.unsubscribe_topic(topic)
        run = getattr(self, "run")  # noqa: B009
        return run(_remove_forwarder, logger_name, topic)


def _check_topic(topic: Any) -> None:
    if isinstance(topic, str) and topic:
        return
    if isinstance(topic, (list, tuple)) and topic and all(isinstance(t, str) for t in topic):
        return
    raise TypeError(f"topic must be a string or a list of strings, got {topic!r}")
