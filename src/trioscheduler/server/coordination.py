"""The scheduler's host for ``core.coordination``: locks, semaphores, events, queues,
variables and multi-locks, answered over the scheduler's request connections.

Thin by design: a request dict becomes one core event (fields checked here, so bad input
is an error reply naming the field, never a crash), the core's ``Reply``/``Fail`` wakes
the request's handler, and ``WantKeys``/``UnwantKeys`` become events of the holder client
``coordination`` in the task core (futures stored in variables and queues stay in
memory). A waiting handler sleeps until its deadline at most, then feeds ``Tick``: the
core decides who timed out. A requester that leaves while it waits is ``Abandon``ed.

Ops (the client side is ``client/coordination.py``): ``coord`` for requests that never
wait, ``coord_wait`` for those that may (the scheduler watches their connection).
Both take ``kind`` and the event's fields; ``client`` (the owner) comes from the
request itself, as every client request names it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import trio

from trioscheduler.core import coordination as c
from trioscheduler.core import messages as m

__all__ = ["HOLDER", "CoordinationHost"]

HOLDER = "coordination"
"""The client id under which the scheduler keeps futures stored in variables and queues."""


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"must be a str, got {type(v).__name__}")
    return v


def _opt_str(v: Any) -> str | None:
    return None if v is None else _str(v)


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"must be an int, got {v!r:.50}")
    return v


def _timeout(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
        raise TypeError(f"must be a number of seconds or None, got {v!r:.50}")
    return None if v == math.inf else max(0.0, float(v))


def _bytes(v: Any) -> bytes:
    if not isinstance(v, bytes):
        raise TypeError(f"must be bytes, got {type(v).__name__}")
    return v


def _keys(v: Any) -> list[Any]:
    if not isinstance(v, list | tuple):
        raise TypeError(f"must be a list of keys, got {type(v).__name__}")
    return list(v)


def _names(v: Any) -> list[str]:
    if not isinstance(v, list | tuple) or not v:
        raise TypeError(f"must be a non-empty list of names, got {v!r:.50}")
    return [_str(x) for x in v]


def _batch(v: Any) -> bool | int:
    if isinstance(v, bool):
        return v
    return _int(v)


_OWNED = ("owner", "worker")
# kind -> (event type, whether it may wait, its fields after now/request, each checked)
_KINDS: dict[str, tuple[type, bool, tuple[tuple[str, Callable[[Any], Any]], ...]]] = {
    "sem_acquire": (c.SemAcquire, True, (("name", _str), ("max_leases", _int), ("lease", _str), ("timeout", _timeout))),
    "sem_release": (c.SemRelease, False, (("name", _str), ("lease", _str))),
    "sem_value": (c.SemValue, False, (("name", _str),)),
    "multi_acquire": (c.MultiAcquire, True, (("ident", _str), ("names", _names), ("num_locks", _int), ("timeout", _timeout))),
    "multi_release": (c.MultiRelease, False, (("ident", _str),)),
    "event_set": (c.EventSet, False, (("name", _str),)),
    "event_clear": (c.EventClear, False, (("name", _str),)),
    "event_is_set": (c.EventIsSet, False, (("name", _str),)),
    "event_wait": (c.EventWait, True, (("name", _str), ("timeout", _timeout))),
    "var_set": (c.VarSet, False, (("name", _str), ("blob", _bytes), ("keys", _keys))),
    "var_get": (c.VarGet, True, (("name", _str), ("timeout", _timeout))),
    "var_delete": (c.VarDelete, False, (("name", _str),)),
    "queue_put": (c.QueuePut, True, (("name", _str), ("maxsize", _int), ("blob", _bytes), ("keys", _keys), ("timeout", _timeout))),
    "queue_get": (c.QueueGet, True, (("name", _str), ("maxsize", _int), ("batch", _batch), ("timeout", _timeout))),
    "queue_size": (c.QueueSize, False, (("name", _str),)),
    "confirm": (c.Confirm, False, (("receipt", _int),)),
}  # fmt: skip
_OWNER_KINDS = frozenset(
    k for k, (t, _, _) in _KINDS.items() if "owner" in getattr(t, "__dataclass_fields__", {})
)


class CoordinationHost:
    """One scheduler's primitives. ``feed_client_event(event_type, client, *fields)``
    hands the holder's key events to the task core (the scheduler's own helper)."""

    def __init__(self, feed_client_event: Callable[..., None], *, validate: bool = False) -> None:
        self.state = c.CoordinationState(validate=validate)
        self._feed_task_core = feed_client_event
        self._requests = itertools.count(1)
        self._waiting: dict[int, list[Any]] = {}  # request -> [trio.Event, effect or None]
        self._workers: set[str] = set()  # the workers there were at the last change

    # -- events in, effects out --------------------------------------------------------

    def _feed(self, event: Any) -> None:
        for eff in self.state.handle(event):
            if isinstance(eff, c.Reply | c.Fail):
                slot = self._waiting.get(eff.request)
                if slot is not None:
                    slot[1] = eff
                    slot[0].set()
            elif isinstance(eff, c.WantKeys):
                self._feed_task_core(m.ClientDesiresKeys, HOLDER, list(eff.keys))
            else:
                self._feed_task_core(m.ClientReleasesKeys, HOLDER, list(eff.keys))

    def client_gone(self, client: str) -> None:
        """A client's stream closed: its leases, locks, waiters and receipts go."""
        self._feed(c.ClientGone(trio.current_time(), client))

    def workers_changed(self, workers: Iterable[str]) -> None:
        """The scheduler's worker set changed: the workers no longer in it are gone."""
        now = set(workers)
        for addr in sorted(self._workers - now):
            self._feed(c.WorkerGone(trio.current_time(), addr))
        self._workers = now

    # -- requests ------------------------------------------------------------------------

    def _event(self, request: dict[str, Any], wait_ok: bool) -> tuple[Any, float | None]:
        kind = request.get("kind")
        spec = _KINDS.get(kind) if isinstance(kind, str) else None
        if spec is None:
            raise ValueError(f"unknown coordination request {kind!r}; known: {sorted(_KINDS)}")
        event_type, may_wait, fields = spec
        if may_wait and not wait_ok:
            raise ValueError(f"{kind} may wait: send it as op 'coord_wait'")
        args: list[Any] = []
        checks: list[tuple[str, Callable[[Any], Any]]] = []
        if kind in _OWNER_KINDS:
            checks += [("client", _str), ("worker", _opt_str)]
        for name, check in checks + list(fields):
            try:
                args.append(check(request.get(name)))
            except TypeError as exc:
                raise TypeError(f"{kind}: {name} {exc}") from None
        now = trio.current_time()
        timeout = args[-1] if may_wait else None
        return event_type(now, next(self._requests), *args), (
            None if timeout is None else now + timeout
        )

    async def answer(self, request: dict[str, Any], wait_ok: bool) -> Any:
        """Feed the request's event; its reply value, or ``{"error": [kind, text]}``."""
        event, deadline = self._event(request, wait_ok)
        slot: list[Any] = [trio.Event(), None]
        self._waiting[event.request] = slot
        try:
            self._feed(event)
            if slot[1] is None:
                with trio.move_on_at(math.inf if deadline is None else deadline):
                    await slot[0].wait()
                if slot[1] is None:  # at the deadline: the core says who timed out
                    self._feed(c.Tick(trio.current_time()))
                    # (another handler's Tick may have answered us already)
            if slot[1] is None:
                raise RuntimeError(f"coordination request {request.get('kind')!r} got no answer")
        except BaseException:
            if slot[1] is None:  # cancelled: the asker left, or the scheduler closes
                self._feed(c.Abandon(trio.current_time(), event.request))
            raise
        finally:
            del self._waiting[event.request]
        eff = slot[1]
        if type(eff) is c.Fail:
            return {"error": [eff.kind, eff.text]}
        return {"value": eff.value}
