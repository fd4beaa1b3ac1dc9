"""Coordination primitives as a pure state machine: semaphores (and locks), multi-locks,
events, variables and queues, as the scheduler keeps them for ``Lock``, ``Semaphore``,
``MultiLock``, ``Event``, ``Variable`` and ``Queue``.

Events in, effects out, time only as ``now`` (the records are in
``coordination_messages.py``, re-exported here): ``CoordinationState.handle(event)`` returns
``Reply``/``Fail`` for requests it answers (at once, or later when a waiter is served),
and ``WantKeys``/``UnwantKeys`` when futures stored in variables and queues must be kept
in cluster memory (the shell turns them into a holder client's ``ClientDesiresKeys`` /
``ClientReleasesKeys``). The shell (``server/coordination.py``) only numbers requests,
waits for their reply and feeds ``Tick`` at a waiter's deadline.

The rules that matter, all here so hypothesis reaches them (``tests/property/
test_coordination_machine.py``):

* A semaphore never has more than ``max_leases`` leases (a lock, ``max_leases=1``, is
  never held twice); waiters are served first come, first served, and none waits while a
  lease is free (no starvation when the holder releases).
* A lease, a multi-lock and a waiting request belong to their ``owner`` (the client id
  that asked) and, for requests made inside a task, to that task's ``worker``:
  ``ClientGone``/``WorkerGone`` returns every lease and lock they held at once and serves
  the next waiters (dask waits out a 30 s lease timeout instead).
* A waiter with a ``timeout`` is answered at the first ``Tick`` at or past its deadline:
  ``False`` for acquire/wait, ``TimeoutError`` for a variable's or queue's get/put.
* Values are opaque bytes (the client pickles; nothing here unpickles). The keys of
  futures inside them are counted: wanted while a variable or queue item holds them, and
  while a receipt is open for a get that handed them out (until the getter's own futures
  exist: ``Confirm``), so a key is never released between the two.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from trioscheduler.core.coordination_messages import (
    Abandon,
    ClientGone,
    Confirm,
    Effect,
    EventClear,
    EventIsSet,
    EventSet,
    EventWait,
    Fail,
    Key,
    MultiAcquire,
    MultiRelease,
    QueueGet,
    QueuePut,
    QueueSize,
    Reply,
    SemAcquire,
    SemRelease,
    SemValue,
    Tick,
    UnwantKeys,
    VarDelete,
    VarGet,
    VarSet,
    WantKeys,
    WorkerGone,
)

__all__ = [
    "Abandon",
    "ClientGone",
    "Confirm",
    "CoordinationState",
    "EventClear",
    "EventIsSet",
    "EventSet",
    "EventWait",
    "Fail",
    "MultiAcquire",
    "MultiRelease",
    "QueueGet",
    "QueuePut",
    "QueueSize",
    "Reply",
    "SemAcquire",
    "SemRelease",
    "SemValue",
    "Tick",
    "UnwantKeys",
    "VarDelete",
    "VarGet",
    "VarSet",
    "WantKeys",
    "WorkerGone",
]

# -- state ------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Lease:
    owner: str
    worker: str | None


@dataclass(slots=True, eq=False)
class Waiter:
    """A request not answered yet, wherever it waits (``kind`` and ``name`` say where)."""

    request: int
    kind: str  # "sem", "multi", "event", "var", "get", "put"
    name: str
    owner: str
    worker: str | None
    deadline: float | None
    lease: str = ""  # sem: the lease it asks for
    batch: bool | int = False  # get
    item: tuple[bytes, tuple[Key, ...]] | None = None  # put: the item waiting for room


@dataclass(slots=True, eq=False)
class Semaphore:
    max_leases: int
    leases: dict[str, Lease] = field(default_factory=dict)
    waiters: deque[int] = field(default_factory=deque)


@dataclass(slots=True, eq=False)
class MultiRequest:
    """One MultiLock's request: queued on every lock it names, done with ``left == 0``."""

    ident: str
    names: list[str]
    left: int
    owner: str
    worker: str | None
    request: int


@dataclass(slots=True, eq=False)
class Queue:
    maxsize: int
    items: deque[tuple[bytes, tuple[Key, ...]]] = field(default_factory=deque)
    getters: deque[int] = field(default_factory=deque)
    putters: deque[int] = field(default_factory=deque)


class CoordinationState:
    """All primitives of one scheduler; ``handle(event) -> effects``."""

    def __init__(self, *, validate: bool = False) -> None:
        self.semaphores: dict[str, Semaphore] = {}
        self.locks: dict[str, list[str]] = {}  # multi-lock name -> idents queued (head holds)
        self.multi: dict[str, MultiRequest] = {}  # ident -> its request
        self.events: dict[str, bool] = {}  # name -> set (absent: clear, nobody waits)
        self.event_waiters: dict[str, list[int]] = {}
        self.variables: dict[str, tuple[bytes, tuple[Key, ...]]] = {}
        self.var_waiters: dict[str, list[int]] = {}
        self.queues: dict[str, Queue] = {}
        self.waiters: dict[int, Waiter] = {}
        self.receipts: dict[int, tuple[str, tuple[Key, ...]]] = {}  # request -> owner, keys
        self.key_refs: dict[Key, int] = {}
        self.validate = validate
        self._out: list[Effect] = []
        self._handlers: dict[type, Callable[[Any], None]] = {
            SemAcquire: self._sem_acquire,
            SemRelease: self._sem_release,
            SemValue: self._sem_value,
            MultiAcquire: self._multi_acquire,
            MultiRelease: self._multi_release,
            EventSet: self._event_set,
            EventClear: self._event_clear,
            EventIsSet: self._event_is_set,
            EventWait: self._event_wait,
            VarSet: self._var_set,
            VarGet: self._var_get,
            VarDelete: self._var_delete,
            QueuePut: self._queue_put,
            QueueGet: self._queue_get,
            QueueSize: self._queue_size,
            Confirm: self._confirm,
            ClientGone: self._client_gone,
            WorkerGone: self._worker_gone,
            Tick: self._tick,
            Abandon: self._abandon,
        }

    # -- the one way in ---------------------------------------------------------------------

    def handle(self, event: Any) -> list[Effect]:
        handler = self._handlers.get(type(event))
        if handler is None:
            raise TypeError(f"not a coordination event: {event!r:.200}")
        out: list[Effect] = []
        self._out = out
        handler(event)
        if self.validate:
            self.check()
        return out

    def next_deadline(self) -> float | None:
        """When the next waiter times out (the shell feeds ``Tick`` then), or ``None``."""
        deadlines = [w.deadline for w in self.waiters.values() if w.deadline is not None]
        return min(deadlines) if deadlines else None

    # -- helpers ----------------------------------------------------------------------------

    def _reply(self, request: int, value: Any) -> None:
        self._out.append(Reply(request, value))

    def _fail(self, request: int, kind: str, text: str) -> None:
        self._out.append(Fail(request, kind, text))

    def _wait(self, waiter: Waiter) -> None:
        self.waiters[waiter.request] = waiter

    @staticmethod
    def _deadline(now: float, timeout: float | None) -> float | None:
        return None if timeout is None else now + max(0.0, timeout)

    def _ref(self, keys: Sequence[Key]) -> None:
        new = []
        for key in keys:
            n = self.key_refs.get(key, 0)
            self.key_refs[key] = n + 1
            if n == 0:
                new.append(key)
        if new:
            self._out.append(WantKeys(new))

    def _unref(self, keys: Sequence[Key]) -> None:
        gone = []
        for key in keys:
            n = self.key_refs[key] - 1
            if n:
                self.key_refs[key] = n
            else:
                del self.key_refs[key]
                gone.append(key)
        if gone:
            self._out.append(UnwantKeys(gone))

    def _hand_out(self, request: int, owner: str, item: tuple[Any, tuple[Key, ...]]) -> list[Any]:
        """``[blob, keys, receipt]`` for a getter; its keys stay counted until ``Confirm``
        (the item's own count moves to the receipt: no release in between)."""
        blob, keys = item
        if keys:
            self.receipts[request] = (owner, keys)
            return [blob, list(keys), request]
        return [blob, [], None]

    # -- semaphores and locks ------------------------------------------------------------------

    def _sem_acquire(self, ev: SemAcquire) -> None:
        if ev.max_leases < 1:
            self._fail(
                ev.request, "ValueError", f"max_leases must be at least 1, got {ev.max_leases}"
            )
            return
        sem = self.semaphores.get(ev.name)
        if sem is None:
            sem = self.semaphores[ev.name] = Semaphore(ev.max_leases)
        elif sem.max_leases != ev.max_leases:
            self._fail(
                ev.request,
                "ValueError",
                f"semaphore {ev.name!r} exists with max_leases={sem.max_leases}, "
                f"asked with max_leases={ev.max_leases}",
            )
            return
        if ev.lease in sem.leases:  # the same request again (a retry): already granted
            self._reply(ev.request, True)
        elif len(sem.leases) < sem.max_leases and not sem.waiters:
            sem.leases[ev.lease] = Lease(ev.owner, ev.worker)
            self._reply(ev.request, True)
        elif ev.timeout is not None and ev.timeout <= 0:
            self._reply(ev.request, False)
        else:
            self._wait(
                Waiter(
                    ev.request, "sem", ev.name, ev.owner, ev.worker,
                    self._deadline(ev.now, ev.timeout), lease=ev.lease,
                )
            )  # fmt: skip
            sem.waiters.append(ev.request)

    def _sem_release(self, ev: SemRelease) -> None:
        sem = self.semaphores.get(ev.name)
        if sem is None or sem.leases.pop(ev.lease, None) is None:
            # Returned already: its holder's worker or client was gone, or a double release.
            self._reply(ev.request, False)
            return
        self._reply(ev.request, True)
        self._serve_semaphore(ev.name, sem)

    def _serve_semaphore(self, name: str, sem: Semaphore) -> None:
        while sem.waiters and len(sem.leases) < sem.max_leases:
            w = self.waiters.pop(sem.waiters.popleft())
            sem.leases[w.lease] = Lease(w.owner, w.worker)
            self._reply(w.request, True)
        if not sem.leases and not sem.waiters:
            del self.semaphores[name]  # recreated on next use, as if new

    def _sem_value(self, ev: SemValue) -> None:
        sem = self.semaphores.get(ev.name)
        self._reply(ev.request, 0 if sem is None else len(sem.leases))

    # -- multi-locks ---------------------------------------------------------------------------

    def _multi_acquire(self, ev: MultiAcquire) -> None:
        names = list(dict.fromkeys(ev.names))
        if ev.ident in self.multi:
            self._fail(
                ev.request,
                "RuntimeError",
                f"MultiLock {ev.ident} asked again while it holds or waits",
            )
            return
        if not 1 <= ev.num_locks <= len(names):
            self._fail(
                ev.request, "ValueError",
                f"num_locks must be between 1 and the number of names ({len(names)}), got {ev.num_locks}",
            )  # fmt: skip
            return
        req = MultiRequest(ev.ident, [], ev.num_locks, ev.owner, ev.worker, ev.request)
        self.multi[ev.ident] = req
        # Shortest queues first (dask's order): a free lock is taken before a busy one.
        for name in sorted(names, key=lambda n: len(self.locks.get(n, ()))):
            queue = self.locks.setdefault(name, [])
            queue.append(ev.ident)
            req.names.append(name)
            if len(queue) == 1:
                req.left -= 1
                if req.left == 0:
                    break  # got enough: the remaining locks are not asked for
        if req.left == 0:
            self._reply(ev.request, True)
        elif ev.timeout is not None and ev.timeout <= 0:
            self._drop_multi(req)
            self._reply(ev.request, False)
        else:
            self._wait(
                Waiter(
                    ev.request,
                    "multi",
                    ev.ident,
                    ev.owner,
                    ev.worker,
                    self._deadline(ev.now, ev.timeout),
                )
            )

    def _multi_release(self, ev: MultiRelease) -> None:
        req = self.multi.get(ev.ident)
        if req is None or req.left > 0:
            self._reply(ev.request, False)
            return
        self._drop_multi(req)
        self._reply(ev.request, True)

    def _drop_multi(self, req: MultiRequest) -> None:
        """Leave every lock queue of ``req``; the next in line of each freed lock moves up."""
        del self.multi[req.ident]
        for name in req.names:
            queue = self.locks[name]
            was_head = queue[0] == req.ident
            queue.remove(req.ident)
            if not queue:
                del self.locks[name]
            elif was_head:
                nxt = self.multi[queue[0]]
                if nxt.left > 0:
                    nxt.left -= 1
                    if nxt.left == 0:
                        self._grant_multi(nxt)

    def _grant_multi(self, req: MultiRequest) -> None:
        del self.waiters[req.request]
        self._reply(req.request, True)
        # Locks it queued for but no longer needs: leave those queues.
        for name in [n for n in req.names if self.locks[n][0] != req.ident]:
            req.names.remove(name)
            self.locks[name].remove(req.ident)

    # -- events --------------------------------------------------------------------------------

    def _event_set(self, ev: EventSet) -> None:
        self.events[ev.name] = True
        for request in self.event_waiters.pop(ev.name, ()):
            del self.waiters[request]
            self._reply(request, True)
        self._reply(ev.request, None)

    def _event_clear(self, ev: EventClear) -> None:
        self.events.pop(ev.name, None)  # clear and unwaited: nothing to keep
        self._reply(ev.request, None)

    def _event_is_set(self, ev: EventIsSet) -> None:
        self._reply(ev.request, self.events.get(ev.name, False))

    def _event_wait(self, ev: EventWait) -> None:
        if self.events.get(ev.name, False):
            self._reply(ev.request, True)
        elif ev.timeout is not None and ev.timeout <= 0:
            self._reply(ev.request, False)
        else:
            self._wait(
                Waiter(
                    ev.request,
                    "event",
                    ev.name,
                    ev.owner,
                    ev.worker,
                    self._deadline(ev.now, ev.timeout),
                )
            )
            self.event_waiters.setdefault(ev.name, []).append(ev.request)

    # -- variables -------------------------------------------------------------------------------

    def _var_set(self, ev: VarSet) -> None:
        keys = tuple(ev.keys)
        self._ref(keys)  # before the old value's keys go: a key in both stays wanted
        old = self.variables.get(ev.name)
        self.variables[ev.name] = (ev.blob, keys)
        if old is not None:
            self._unref(old[1])
        for request in self.var_waiters.pop(ev.name, ()):
            w = self.waiters.pop(request)
            self._ref(keys)
            self._reply(request, self._hand_out(request, w.owner, (ev.blob, keys)))
        self._reply(ev.request, None)

    def _var_get(self, ev: VarGet) -> None:
        value = self.variables.get(ev.name)
        if value is not None:
            self._ref(value[1])
            self._reply(ev.request, self._hand_out(ev.request, ev.owner, value))
        elif ev.timeout is not None and ev.timeout <= 0:
            self._fail(ev.request, "TimeoutError", f"variable {ev.name!r} has no value")
        else:
            self._wait(
                Waiter(
                    ev.request,
                    "var",
                    ev.name,
                    ev.owner,
                    ev.worker,
                    self._deadline(ev.now, ev.timeout),
                )
            )
            self.var_waiters.setdefault(ev.name, []).append(ev.request)

    def _var_delete(self, ev: VarDelete) -> None:
        old = self.variables.pop(ev.name, None)
        if old is not None:
            self._unref(old[1])
        self._reply(ev.request, old is not None)

    # -- queues ----------------------------------------------------------------------------------

    def _queue(self, name: str, maxsize: int) -> Queue:
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = Queue(max(0, maxsize))
        return q

    def _queue_put(self, ev: QueuePut) -> None:
        q = self._queue(ev.name, ev.maxsize)
        item = (ev.blob, tuple(ev.keys))
        self._ref(item[1])
        if q.maxsize and len(q.items) >= q.maxsize:
            if ev.timeout is not None and ev.timeout <= 0:
                self._unref(item[1])
                self._fail(
                    ev.request, "TimeoutError", f"queue {ev.name!r} is full ({q.maxsize} items)"
                )
                return
            self._wait(
                Waiter(
                    ev.request, "put", ev.name, ev.owner, ev.worker,
                    self._deadline(ev.now, ev.timeout), item=item,
                )
            )  # fmt: skip
            q.putters.append(ev.request)
            return
        q.items.append(item)
        self._reply(ev.request, None)
        self._serve_queue(ev.name, q)

    def _queue_get(self, ev: QueueGet) -> None:
        if isinstance(ev.batch, bool):
            n = 0 if ev.batch else 1
        elif ev.batch < 1:
            self._fail(
                ev.request,
                "ValueError",
                f"batch must be True, False or a count >= 1, got {ev.batch}",
            )
            return
        else:
            n = ev.batch
        q = self._queue(ev.name, ev.maxsize)
        if n == 0:  # batch=True: whatever is there now, never waits
            items = list(q.items)
            q.items.clear()
            self._reply(ev.request, self._hand_out_one(ev.request, ev.owner, items))
            self._serve_queue(ev.name, q)
            return
        if not q.getters and len(q.items) >= n:
            self._take(ev.request, ev.owner, q, ev.batch)
            self._serve_queue(ev.name, q)
        elif ev.timeout is not None and ev.timeout <= 0:
            self._fail(ev.request, "TimeoutError", f"queue {ev.name!r} has fewer than {n} items")
        else:
            self._wait(
                Waiter(
                    ev.request, "get", ev.name, ev.owner, ev.worker,
                    self._deadline(ev.now, ev.timeout), batch=ev.batch,
                )
            )  # fmt: skip
            q.getters.append(ev.request)
            self._serve_queue(ev.name, q)  # a putter may wait for room a big batch needs

    def _hand_out_one(
        self, request: int, owner: str, items: list[tuple[bytes, tuple[Key, ...]]]
    ) -> Any:
        """A batch's items as one list ``[[blob, ...], keys, receipt]``."""
        keys = tuple(k for _, ks in items for k in ks)
        return self._hand_out(request, owner, ([b for b, _ in items], keys))

    def _take(self, request: int, owner: str, q: Queue, batch: bool | int) -> None:
        if batch is False:
            self._reply(request, self._hand_out(request, owner, q.items.popleft()))
        else:
            items = [q.items.popleft() for _ in range(int(batch))]
            self._reply(request, self._hand_out_one(request, owner, items))

    def _serve_queue(self, name: str, q: Queue) -> None:
        """Move putters into free room and items to getters until neither can move."""
        moved = True
        while moved:
            moved = False
            while q.putters and (not q.maxsize or len(q.items) < q.maxsize):
                w = self.waiters.pop(q.putters.popleft())
                assert w.item is not None
                q.items.append(w.item)
                self._reply(w.request, None)
                moved = True
            if q.getters:
                w = self.waiters[q.getters[0]]
                n = 1 if w.batch is False else int(w.batch)
                if len(q.items) >= n:
                    q.getters.popleft()
                    del self.waiters[w.request]
                    self._take(w.request, w.owner, q, w.batch)
                    moved = True

    def _queue_size(self, ev: QueueSize) -> None:
        q = self.queues.get(ev.name)
        self._reply(ev.request, 0 if q is None else len(q.items))

    def _confirm(self, ev: Confirm) -> None:
        entry = self.receipts.pop(ev.receipt, None)
        if entry is not None:
            self._unref(entry[1])
        self._reply(ev.request, entry is not None)

    # -- holders that go away, waiters that time out -----------------------------------------------

    def _client_gone(self, ev: ClientGone) -> None:
        self._drop_holder(lambda owner, worker: owner == ev.client, f"client {ev.client} left")

    def _worker_gone(self, ev: WorkerGone) -> None:
        self._drop_holder(lambda owner, worker: worker == ev.worker, f"worker {ev.worker} left")

    def _drop_holder(self, match: Callable[[str, str | None], bool], why: str) -> None:
        """Cancel the waiters, return the leases and locks, close the receipts of a holder."""
        for w in [w for w in self.waiters.values() if match(w.owner, w.worker)]:
            if w.request not in self.waiters:
                continue  # served meanwhile (its own other waiter left); a lease goes below
            self._cancel_waiter(w)
            self._fail(w.request, "RuntimeError", f"{why} while this request waited")
        for name, sem in list(self.semaphores.items()):
            gone = [lease for lease, h in sem.leases.items() if match(h.owner, h.worker)]
            for lease in gone:
                del sem.leases[lease]
            if gone:
                self._serve_semaphore(name, sem)
        for req in [r for r in self.multi.values() if match(r.owner, r.worker)]:
            if req.ident in self.multi:
                self._drop_multi(req)
        for request, (owner, keys) in list(self.receipts.items()):
            if match(owner, None):
                del self.receipts[request]
                self._unref(keys)

    def _tick(self, ev: Tick) -> None:
        for w in sorted(self.waiters.values(), key=lambda w: w.request):
            if w.deadline is None or w.deadline > ev.now or w.request not in self.waiters:
                continue
            self._cancel_waiter(w)
            if w.kind in ("sem", "multi", "event"):
                self._reply(w.request, False)
            else:
                what = {"var": "variable {!r} had no value", "get": "queue {!r} had no item",
                        "put": "queue {!r} had no room"}[w.kind].format(w.name)  # fmt: skip
                self._fail(w.request, "TimeoutError", f"{what} within the timeout")

    def _abandon(self, ev: Abandon) -> None:
        w = self.waiters.get(ev.request)
        if w is not None:
            self._cancel_waiter(w)

    def _cancel_waiter(self, w: Waiter) -> None:
        """Forget a waiter wherever it waits; what its leaving frees goes to the next."""
        del self.waiters[w.request]
        if w.kind == "sem":
            sem = self.semaphores[w.name]
            sem.waiters.remove(w.request)
            self._serve_semaphore(w.name, sem)  # a big waiter ahead may have held others up
        elif w.kind == "multi":
            self._drop_multi(self.multi[w.name])
        elif w.kind == "event":
            waiting = self.event_waiters[w.name]
            waiting.remove(w.request)
            if not waiting:
                del self.event_waiters[w.name]
        elif w.kind == "var":
            waiting = self.var_waiters[w.name]
            waiting.remove(w.request)
            if not waiting:
                del self.var_waiters[w.name]
        else:
            q = self.queues[w.name]
            if w.kind == "get":
                q.getters.remove(w.request)
            else:
                q.putters.remove(w.request)
                assert w.item is not None
                self._unref(w.item[1])
            self._serve_queue(w.name, q)

    # -- invariants ------------------------------------------------------------------------------

    def check(self) -> None:
        """Every invariant of the state; raises ``AssertionError`` naming the broken one."""
        for name, sem in self.semaphores.items():
            assert len(sem.leases) <= sem.max_leases, f"semaphore {name} overbooked"
            assert not (sem.waiters and len(sem.leases) < sem.max_leases), (
                f"semaphore {name}: a waiter waits while a lease is free"
            )
            for request in sem.waiters:
                assert self.waiters[request].kind == "sem"
        for name, queue in self.locks.items():
            assert queue and len(set(queue)) == len(queue), f"lock {name} queue {queue}"
            for ident in queue:
                assert name in self.multi[ident].names
        for ident, req in self.multi.items():
            heads = sum(1 for n in req.names if self.locks[n][0] == ident)
            need = len(req.names) if req.left == 0 else None
            if req.left == 0:
                assert heads == need, f"MultiLock {ident} holds {heads} of {req.names}"
            else:
                assert req.request in self.waiters, f"MultiLock {ident} waits without a waiter"
        for name, q in self.queues.items():
            assert not q.maxsize or len(q.items) <= q.maxsize, f"queue {name} over its size"
            if q.getters:
                w = self.waiters[q.getters[0]]
                n = 1 if w.batch is False else int(w.batch)
                assert len(q.items) < n, f"queue {name}: a getter waits beside enough items"
            if q.putters:
                assert q.maxsize and len(q.items) >= q.maxsize, (
                    f"queue {name}: a putter waits beside room"
                )
        refs: dict[Key, int] = {}
        held = [v[1] for v in self.variables.values()]
        held += [item[1] for q in self.queues.values() for item in q.items]
        held += [w.item[1] for w in self.waiters.values() if w.item is not None]
        held += [keys for _, keys in self.receipts.values()]
        for keys in held:
            for key in keys:
                refs[key] = refs.get(key, 0) + 1
        assert refs == self.key_refs, f"key counts {self.key_refs} != held {refs}"
