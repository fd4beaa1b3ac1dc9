"""The cluster machine's rules of messages and work: deliveries, task runs, transfers
and spill writes (``work``, drawn WORK_WEIGHT times as often as a rule), rounds of
everything, a straggling run or transfer, a failed transfer, and a key computed again
while its old run or transfer still goes on (``rerun_moving``: ``cancelled``,
``resumed``).

A mixin of ``ClusterMachine`` (``test_cluster_machine.py``); shared parts in
``machine_parts.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule
from machine_parts import CLIENTS, MOVING, MachineParts, guarded, index, pick


class WorkRules(MachineParts):
    def work(self, step: tuple[str, int, int, bool]) -> None:
        """One small step of message delivery or work, its kind drawn with weights.

        ``deliver``: the next ``n`` messages of one stream as a batch; ``finish``: a
        running task ends (fails if built to fail this time); ``secede``, ``reschedule``;
        ``gather``: a transfer ends (the keys the peer still holds arrive, or it fails
        outright); ``writes``: a spill writer completes its oldest writes; ``round``: one
        round of every delivery, task, transfer and write (deeper states sooner). A kind
        with nothing to do delivers instead.

        Registered as WORK_WEIGHT identical rules (``work_0``...) below: hypothesis draws
        every rule about as often as any other, and a cluster whose messages and tasks
        move one rule in thirty has every key released or its worker dead before a
        transfer is ever in flight. ``round`` is one kind among many for the same
        reason: a flush drawn as often as the rest would leave nothing to interleave.
        """
        kind, i, n, fail = step
        sim = self.sim
        running = sim.running_tasks()
        gathers = sim.pending_gathers()
        writes = sim.pending_writes()
        if kind == "finish" and running:
            sim.finish(*pick(running, i))
        elif kind == "secede" and running:
            sim.secede(*pick(running, i))
        elif kind == "reschedule" and running:
            sim.reschedule(*pick(running, i))
        elif kind == "gather" and gathers:
            addr, peer = pick(gathers, i)
            sim.gather(addr, peer, fail=fail and n == 1)
        elif kind == "writes" and writes:
            sim.finish_writes(pick(writes, i), None if fail else n)
        elif kind == "round":
            self._one_round()
        elif sim.nonempty_queues():
            src, dst = pick(sim.nonempty_queues(), i)
            sim.deliver(src, dst, n)

    def _one_round(self, slow: tuple[str, str, Any] | None = None) -> None:
        """Every delivery, task, transfer and write once; not ``slow``: ``("run", worker,
        key)`` or ``("gather", worker, peer)``, a thread or transfer that takes longer."""
        sim = self.sim
        for src, dst in sim.nonempty_queues():
            if dst == "scheduler" or dst in sim.workers:
                sim.deliver(src, dst, 1_000)
        for addr, key in sim.running_tasks():
            if addr in sim.workers and key in sim.workers[addr].running:
                if slow != ("run", addr, key):
                    sim.finish(addr, key)
        for addr, peer in sim.pending_gathers():
            if addr in sim.workers and peer in sim.workers[addr].gathers:
                if slow != ("gather", addr, peer):
                    sim.gather(addr, peer)
        for addr in sim.pending_writes():
            if addr in sim.workers:
                sim.finish_writes(addr)

    @precondition(lambda self: bool(self.sim.running_tasks() or self.sim.pending_gathers()))
    @rule(i=index, gather=st.booleans(), rounds=st.integers(1, 4))
    @guarded
    def straggle(self, i: int, gather: bool, rounds: int) -> None:
        """One task thread (or, ``gather``, one transfer) is slow: ``rounds`` rounds of
        everything else go by while it runs. The cluster moves on around a straggler:
        the scheduler may give its key up, compute it elsewhere and send a dependent
        back before it ends (with ``rerun_moving`` and ``lose_holder``: ``resumed``)."""
        sim = self.sim
        gathers = sim.pending_gathers()
        running = sim.running_tasks()
        slow: tuple[str, str, Any]
        if gathers and (gather or not running):
            slow = ("gather", *pick(gathers, i))
        else:
            slow = ("run", *pick(running, i))
        for _ in range(rounds):
            self._one_round(slow)

    def _moving(self, state: str) -> list[tuple[str, Any]]:
        """(worker, key) pairs: a computed key a worker is running, fetching or still
        finishing after the scheduler gave it up (cancelled, resumed); those in
        ``state`` if any (``flight`` and ``resumed`` are short, ``executing`` common)."""
        sim = self.sim
        graph = sim.graph
        found = [
            (a, k, ts.state) for a, w in sorted(sim.workers.items())
            for k, ts in w.state.tasks.items()
            if ts.state in MOVING and k in graph and not graph[k].scattered
        ]  # fmt: skip
        return [(a, k) for a, k, st_ in found if st_ == state] or [(a, k) for a, k, _ in found]

    @precondition(
        lambda self: any(
            ts.state in MOVING for w in self.sim.workers.values() for ts in w.state.tasks.values()
        )
    )  # fmt: skip
    @rule(state=st.sampled_from(sorted(MOVING)), i=index, j=index, k=index,
          where=st.sampled_from(["here", "there", "back"]), deliver=st.booleans(),
          rounds=st.integers(0, 4),
          end=st.sampled_from(["no", "secede", "reschedule", "finish"]))  # fmt: skip
    @guarded
    def rerun_moving(
        self, state: str, i: int, j: int, k: int, where: str, deliver: bool, rounds: int,
        end: str,
    ) -> None:
        """The clients cancel a key a worker is running or fetching (``state``), and
        everything they want downstream of it, and at once submit the same keys again,
        asking (loosely) for that worker for the key (``here``; its dependents for worker
        ``k``), or for worker ``j`` for the key and that worker for its dependents
        (``there``): the scheduler decides anew while the old run or transfer goes on, so
        the worker hears of the key again before its thread or transfer ends
        (``cancelled``, ``resumed`` and back; dask: a key recomputed after
        ``client.cancel``, or a dependent placed where an old run still goes).
        ``deliver``: the worker's messages from the scheduler arrive at once;
        ``rounds``: rounds of everything else go by while the old run or transfer lasts
        (until the worker hears of the key again).
        ``back``: as ``there``, the key may also go to the old worker, and after the
        rounds the worker that computed it dies (if the run may still lose one): the
        scheduler computes it again, on the old worker, whose old run still goes on for
        the dependent waiting there (``resumed`` asked to run again). ``end``: the old
        run secedes first, or raises ``Reschedule`` at the end; ``finish``: the old run
        or transfer ends as soon as the worker heard of the key again (a transfer then
        brings what the scheduler now wants computed there: ``resumed -> memory``)."""
        sim = self.sim
        moving = self._moving(state)
        if not moving:
            return
        addr, key = pick(moving, i)
        s = sim.scheduler
        below = {key}  # the key and its dependents, transitively
        stack = [key]
        while stack:
            sts = s.tasks.get(stack.pop())
            for d in sts.dependents if sts is not None else ():
                if d not in below:
                    below.add(d)
                    stack.append(d)
        wanted = {c: sorted(ks & below, key=repr) for c, ks in sorted(sim.wants.items())}
        wanted = {c: ks for c, ks in wanted.items() if ks}
        if not wanted:  # the scheduler gave the key up: a client asks for it again
            wanted = {CLIENTS[i % len(CLIENTS)]: [key]}
        graph = sim.graph
        lineages = {c: set().union(*(sim.lineage(x) for x in ks)) for c, ks in wanted.items()}
        if any(graph[x].scattered for ls in lineages.values() for x in ls):
            return  # a scattered input cannot be submitted again, only scattered
        wts = sim.workers[addr].state.tasks[key]
        slow: tuple[str, str, Any] | None = None
        if key in sim.workers[addr].running:
            slow = ("run", addr, key)
            if end == "secede":
                sim.secede(addr, key)
        elif wts.coming_from is not None:
            slow = ("gather", addr, wts.coming_from)
        for c, ks in wanted.items():
            sim.cancel(c, ks, force=True)
        workers = sorted(sim.workers)
        others = [a for a in workers if a != addr] or workers
        if where == "here":
            first, then = [addr], [pick(workers, k)]
        else:
            first, then = [pick(others, j)], [addr]
            if where == "back":
                first.append(addr)
        for c, ks in wanted.items():
            tasks = []
            for x, t in graph.items():
                if x not in lineages[c]:
                    continue
                if x in below:  # asked for a worker, loosely (it may be gone by then)
                    w = first if x == key else then
                    t = dataclasses.replace(t, workers=w, allow_other_workers=True)
                tasks.append(t)
            sim.submit(c, tasks, ks)
        if deliver and addr in sim.workers:
            sim.deliver("scheduler", addr, 1_000)
        if end == "finish" and slow is not None and addr in sim.workers:
            w = sim.workers[addr]
            if slow[0] == "run" and key in w.running:
                sim.finish(addr, key)
            elif slow[0] == "gather" and slow[2] in w.gathers:
                sim.gather(addr, slow[2])
            slow = None
        for _ in range(rounds):
            self._one_round(slow)
            w = sim.workers.get(addr)
            now = w.state.tasks.get(key) if w is not None else None
            if now is None or now.state != "cancelled":
                break  # the worker heard of the key again, or its old run ended
        sts = s.tasks.get(key)
        if where == "back" and self.races > 0 and sts is not None and sts.state == "memory":
            gone = sorted(a for a in sts.who_has if a != addr and a in sim.workers)
            if gone:
                self.races -= 1
                sim.lose_worker(gone[0])
        if end == "reschedule" and addr in sim.workers and key in sim.workers[addr].running:
            sim.reschedule(addr, key)

    @precondition(lambda self: bool(self.sim.pending_gathers()))
    @rule(i=index)
    @guarded
    def fail_transfer(self, i: int) -> None:
        """A transfer fails (the connection broke): the fetcher tries another holder,
        or, knowing none, asks the scheduler (``missing``, ``MissingData``)."""
        addr, peer = pick(self.sim.pending_gathers(), i)
        self.sim.gather(addr, peer, fail=True)
