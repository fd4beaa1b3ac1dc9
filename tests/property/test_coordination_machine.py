"""Hypothesis drives ``core.coordination``: locks, semaphores, multi-locks, events,
variables and queues, with holders that die and waiters that time out.

A model kept from the replies alone (which leases each request was granted, which
holder went away) is compared with the state after every step, beside the state's own
``check()``: a lock is never held twice, a dead client's or worker's leases are always
returned, and nobody waits while a lease is free (a waiter never starves when a holder
releases). Every request is answered exactly once.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from trioscheduler.core import coordination as c

CLIENTS = ["c0", "c1", "c2"]
WORKERS = [None, "w0", "w1"]
SEMAPHORES = {"lock": 1, "sem": 2}
LOCKS = ["a", "b", "c"]
TIMEOUTS = st.sampled_from([None, 0.0, 0.5, 2.0])


class CoordinationMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = c.CoordinationState(validate=True)
        self.now = 0.0
        self.next_request = 0
        self.pending: dict[int, tuple[str, Any]] = {}  # request -> (kind, detail)
        self.answered: set[int] = set()
        self.held: dict[str, dict[str, tuple[str, str | None]]] = {n: {} for n in SEMAPHORES}
        self.multi_held: dict[str, tuple[str, str | None]] = {}  # ident -> holder
        self.gone_clients: set[str] = set()
        self.gone_workers: set[str] = set()
        self.counter = 0
        self.receipts: list[int] = []  # gets that handed out futures, not yet confirmed

    def _feed(self, event: Any) -> list[Any]:
        effects = self.state.handle(event)
        for eff in effects:
            if isinstance(eff, c.Reply | c.Fail):
                assert eff.request in self.pending, f"reply to an unknown request {eff}"
                assert eff.request not in self.answered, f"answered twice: {eff}"
                self.answered.add(eff.request)
                kind, detail = self.pending.pop(eff.request)
                if kind == "sem" and isinstance(eff, c.Reply) and eff.value is True:
                    name, lease, owner, worker = detail
                    self.held[name][lease] = (owner, worker)
                if kind == "multi" and isinstance(eff, c.Reply) and eff.value is True:
                    ident, owner, worker = detail
                    self.multi_held[ident] = (owner, worker)
                if isinstance(eff, c.Reply) and isinstance(eff.value, list) and eff.value[2]:
                    self.receipts.append(eff.value[2])
        return effects

    def _request(self, kind: str, detail: Any = None) -> int:
        self.next_request += 1
        self.pending[self.next_request] = (kind, detail)
        return self.next_request

    def _alive(self, client: str, worker: str | None) -> bool:
        return client not in self.gone_clients and worker not in self.gone_workers

    # -- semaphores ------------------------------------------------------------------

    @rule(
        client=st.sampled_from(CLIENTS),
        worker=st.sampled_from(WORKERS),
        name=st.sampled_from(sorted(SEMAPHORES)),
        timeout=TIMEOUTS,
    )
    def acquire(self, client: str, worker: str | None, name: str, timeout: float | None) -> None:
        if not self._alive(client, worker):
            return
        self.counter += 1
        lease = f"lease-{self.counter}"
        r = self._request("sem", (name, lease, client, worker))
        self._feed(
            c.SemAcquire(self.now, r, client, worker, name, SEMAPHORES[name], lease, timeout)
        )

    @precondition(lambda self: any(self.held.values()))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from([n for n in SEMAPHORES if self.held[n]]))
        lease = data.draw(st.sampled_from(sorted(self.held[name])))
        del self.held[name][lease]
        r = self._request("release")
        first = self._feed(c.SemRelease(self.now, r, name, lease))[0]
        assert isinstance(first, c.Reply) and (first.request, first.value) == (r, True)

    @rule(name=st.sampled_from(sorted(SEMAPHORES)))
    def release_not_held(self, name: str) -> None:
        r = self._request("release")
        effects = self._feed(c.SemRelease(self.now, r, name, "never-granted"))
        assert [(type(e), e.value) for e in effects] == [(c.Reply, False)]

    # -- multi-locks -----------------------------------------------------------------------

    @rule(
        client=st.sampled_from(CLIENTS),
        worker=st.sampled_from(WORKERS),
        names=st.lists(st.sampled_from(LOCKS), min_size=1, max_size=3, unique=True),
        data=st.data(),
        timeout=TIMEOUTS,
    )
    def multi_acquire(
        self,
        client: str,
        worker: str | None,
        names: list[str],
        data: st.DataObject,
        timeout: float | None,
    ) -> None:
        if not self._alive(client, worker):
            return
        num = data.draw(st.integers(1, len(names)))
        self.counter += 1
        ident = f"ml-{self.counter}"
        r = self._request("multi", (ident, client, worker))
        self._feed(c.MultiAcquire(self.now, r, client, worker, ident, names, num, timeout))

    @precondition(lambda self: bool(self.multi_held))
    @rule(data=st.data())
    def multi_release(self, data: st.DataObject) -> None:
        ident = data.draw(st.sampled_from(sorted(self.multi_held)))
        del self.multi_held[ident]
        r = self._request("release")
        effects = self._feed(c.MultiRelease(self.now, r, ident))
        assert any(isinstance(e, c.Reply) and e.request == r and e.value for e in effects)

    # -- events, variables, queues -----------------------------------------------------------

    @rule(client=st.sampled_from(CLIENTS), timeout=TIMEOUTS, op=st.sampled_from("wsc"))
    def event(self, client: str, timeout: float | None, op: str) -> None:
        if client in self.gone_clients:
            return
        r = self._request("event")
        if op == "w":
            self._feed(c.EventWait(self.now, r, client, None, "e", timeout))
        elif op == "s":
            self._feed(c.EventSet(self.now, r, "e"))
            assert not self.state.event_waiters
        else:
            self._feed(c.EventClear(self.now, r, "e"))

    @rule(
        client=st.sampled_from(CLIENTS),
        op=st.sampled_from("sgd"),
        keys=st.lists(st.sampled_from("xyz"), max_size=2),
        timeout=TIMEOUTS,
    )
    def variable(self, client: str, op: str, keys: list[str], timeout: float | None) -> None:
        if client in self.gone_clients:
            return
        r = self._request("var")
        if op == "s":
            self._feed(c.VarSet(self.now, r, "v", b"value", keys))
        elif op == "g":
            self._feed(c.VarGet(self.now, r, client, None, "v", timeout))
        else:
            self._feed(c.VarDelete(self.now, r, "v"))

    @rule(
        client=st.sampled_from(CLIENTS),
        worker=st.sampled_from(WORKERS),
        put=st.booleans(),
        keys=st.lists(st.sampled_from("xyz"), max_size=2),
        batch=st.sampled_from([False, True, 2]),
        timeout=TIMEOUTS,
    )
    def queue(
        self,
        client: str,
        worker: str | None,
        put: bool,
        keys: list[str],
        batch: bool | int,
        timeout: float | None,
    ) -> None:
        if not self._alive(client, worker):
            return
        r = self._request("queue")
        if put:
            self._feed(c.QueuePut(self.now, r, client, worker, "q", 2, b"item", keys, timeout))
        else:
            self._feed(c.QueueGet(self.now, r, client, worker, "q", 2, batch, timeout))

    @precondition(lambda self: bool(self.receipts))
    @rule(data=st.data())
    def confirm(self, data: st.DataObject) -> None:
        receipt = data.draw(st.sampled_from(self.receipts))
        self.receipts.remove(receipt)
        self._feed(c.Confirm(self.now, self._request("confirm"), receipt))

    # -- holders leave, time passes -----------------------------------------------------------

    @rule(client=st.sampled_from(CLIENTS))
    def client_gone(self, client: str) -> None:
        self.gone_clients.add(client)
        self._feed(c.ClientGone(self.now, client))
        self._forget(lambda owner, worker: owner == client)

    @rule(worker=st.sampled_from(WORKERS[1:]))
    def worker_gone(self, worker: str) -> None:
        self.gone_workers.add(worker)
        self._feed(c.WorkerGone(self.now, worker))
        self._forget(lambda owner, w: w == worker)

    def _forget(self, match: Any) -> None:
        for held in self.held.values():
            for lease in [lease for lease, h in held.items() if match(*h)]:
                del held[lease]
        for ident in [i for i, h in self.multi_held.items() if match(*h)]:
            del self.multi_held[ident]

    @precondition(lambda self: bool(self.state.waiters))
    @rule(data=st.data())
    def abandon(self, data: st.DataObject) -> None:
        request = data.draw(st.sampled_from(sorted(self.state.waiters)))
        effects = self._feed(c.Abandon(self.now, request))
        assert all(getattr(e, "request", None) != request for e in effects)
        del self.pending[request]  # its asker left: never answered

    @rule(dt=st.sampled_from([0.25, 1.0, 3.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        self._feed(c.Tick(self.now))
        deadline = self.state.next_deadline()
        assert deadline is None or deadline > self.now, "a waiter outlived its deadline"

    # -- what must always hold -------------------------------------------------------------

    @invariant()
    def leases_match_the_model(self) -> None:
        for name, max_leases in SEMAPHORES.items():
            assert len(self.held[name]) <= max_leases, f"{name} held {self.held[name]}"
            sem = self.state.semaphores.get(name)
            leases = {} if sem is None else sem.leases
            assert {k: (h.owner, h.worker) for k, h in leases.items()} == self.held[name]

    @invariant()
    def nothing_belongs_to_the_dead(self) -> None:
        for holder in [*self.held["lock"].values(), *self.held["sem"].values(),
                       *self.multi_held.values()]:  # fmt: skip
            assert self._alive(*holder), f"{holder} is gone but holds"
        for w in self.state.waiters.values():
            assert self._alive(w.owner, w.worker), f"{w} is gone but waits"

    @invariant()
    def multi_locks_exclusive(self) -> None:
        held_locks: dict[str, str] = {}
        for ident in self.multi_held:
            req = self.state.multi[ident]
            for name in req.names:
                assert name not in held_locks, f"{name} held by {held_locks[name]} and {ident}"
                held_locks[name] = ident

    @invariant()
    def waiting_requests_are_pending(self) -> None:
        assert set(self.state.waiters) <= set(self.pending)
        # A request not answered is still waiting somewhere: none is lost.
        assert set(self.pending) == set(self.state.waiters)


TestCoordination = CoordinationMachine.TestCase
