"""The cluster machine's rules of workers and the scheduler: workers join, die (at a
chosen moment: holding data others need, mid-transfer, just as a fetch starts, across a
steal), restart at their address, retire, come under memory pressure, fail a spill; the
scheduler crashes and restarts from its log; heartbeats, ticks and time passing.

A mixin of ``ClusterMachine`` (``test_cluster_machine.py``); shared parts in
``machine_parts.py``.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule
from machine_parts import (
    MAX_WORKERS,
    MEMORY_LIMIT,
    NAMES,
    TALLY,
    TIMEOUT,
    MachineParts,
    guarded,
    index,
    pick,
)

from trioscheduler.core.messages import ComputeTask, FreeKeys, StealRequest
from trioscheduler.core.sim_restart import restart_scheduler


class FaultRules(MachineParts):
    def _held_for_others(self) -> list[str]:
        """Workers holding data that a task elsewhere still needs."""
        s = self.sim.scheduler
        out = set()
        for ts in s.tasks.values():
            if ts.state == "memory" and any(
                s.tasks[d].state in ("waiting", "no-worker", "queued", "processing")
                for d in ts.dependents
            ):
                out.update(ts.who_has)
        return sorted(out)

    @precondition(lambda self: self.aimed > 0 and bool(self._held_for_others()))
    @rule(i=index)
    @guarded
    def lose_holder(self, i: int) -> None:
        """A worker dies holding data that a task elsewhere still needs."""
        self.aimed -= 1
        addr = pick(self._held_for_others(), i)
        if addr in self.sim.workers:
            self.sim.lose_worker(addr)

    @precondition(lambda self: len(self.sim.workers) < MAX_WORKERS)
    @rule(name=st.sampled_from([None, *NAMES]), nthreads=st.integers(1, 2), gpu=st.booleans(),
          limited=st.booleans())  # fmt: skip
    @guarded
    def add_worker(self, name: str | None, nthreads: int, gpu: bool, limited: bool) -> None:
        if name in {w.name for w in self.sim.workers.values()}:
            name = None
        gpu = gpu or name is not None  # a task may ask for a name and a GPU together
        self.sim.add_worker(
            name=name, nthreads=nthreads, resources={"GPU": 1.0} if gpu else None,
            memory_limit=MEMORY_LIMIT if limited else 0,
            # as dask's worker: 10% of its memory limit in flight (200 bytes; keys of 10,
            # 100 or 700 bytes: a 700-byte key comes alone, when nothing else is in flight)
            transfer_incoming_bytes_limit=MEMORY_LIMIT // 10 if limited else None,
        )  # fmt: skip

    @precondition(lambda self: bool(self.sim.workers) and self.faults > 0)
    @rule(i=index, flush=st.booleans())
    @guarded
    def lose_worker(self, i: int, flush: bool) -> None:
        self.faults -= 1
        self.sim.lose_worker(pick(list(self.sim.workers), i), flush=flush)

    @precondition(lambda self: self.races > 0 and bool(self.sim.pending_gathers()))
    @rule(i=index, then=st.sampled_from(["nothing", "deliver", "gather"]))
    @guarded
    def lose_peer_in_flight(self, i: int, then: str) -> None:
        """A worker dies while another fetches data from it. The scheduler recomputes
        what only the dead worker held, perhaps on the fetcher: ``deliver`` hands the
        fetcher that news before its transfer fails (``flight -> resumed``), ``gather``
        after (``fetch``/``missing -> waiting``); the first ``deliver`` of a run that can
        has the scheduler crash right after that news (``_crash_behind``)."""
        self.races -= 1
        sim = self.sim
        addr, peer = pick(sim.pending_gathers(), i)
        if peer not in sim.workers:
            return
        self._lose_while_fetching(addr, peer, then)

    def _about_to_fetch(self) -> list[tuple[str, str]]:
        """(worker, peer): a ``ComputeTask`` on its way to the worker names an input only
        the (live) peer holds, which the scheduler can compute again."""
        sim = self.sim
        graph = sim.graph
        out = []
        for (src, dst), q in sim.queues.items():
            if src != "scheduler" or dst not in sim.workers:
                continue
            for msg in q:
                if type(msg) is ComputeTask:
                    for k, holders in msg.who_has.items():
                        if (
                            len(holders) == 1 and holders[0] != dst and holders[0] in sim.workers
                            and k in graph and not graph[k].scattered
                        ):  # fmt: skip
                            out.append((dst, holders[0]))
        return sorted(set(out))

    @precondition(lambda self: self.races > 0 and bool(self._about_to_fetch()))
    @rule(i=index, then=st.sampled_from(["deliver", "gather"]))
    @guarded
    def lose_source(self, i: int, then: str) -> None:
        """A worker dies just as another starts fetching from it: the fetcher hears of
        its task (it fetches the input), the holder dies, and the scheduler computes
        the input again, perhaps on the fetcher itself, which hears of that before its
        transfer fails (``deliver``: ``flight -> resumed``) or after (``gather``:
        ``missing``/``fetch -> waiting``); the first ``deliver`` of a run that can has
        the scheduler crash right after that news (``_crash_behind``)."""
        self.races -= 1
        sim = self.sim
        addr, peer = pick(self._about_to_fetch(), i)
        sim.deliver("scheduler", addr, 1_000)
        if peer not in sim.workers or addr not in sim.workers:
            return
        self._lose_while_fetching(addr, peer, then)

    def _lose_while_fetching(self, addr: str, peer: str, then: str) -> None:
        """``peer`` dies while ``addr`` fetches from it; ``addr`` hears its transfer
        failed (``gather``) or not yet, then what the scheduler says (unless ``nothing``;
        ``deliver``, once a run: only up to the ``ComputeTask`` of a key it fetches for a
        local task, and the scheduler crashes, see ``_crash_behind``)."""
        sim = self.sim
        sim.lose_worker(peer)
        if addr not in sim.workers:
            return
        if then == "deliver" and self._crash_behind(addr):
            return
        if then == "gather" and peer in sim.workers[addr].gathers:
            sim.gather(addr, peer)
        if then != "nothing":
            sim.deliver("scheduler", addr, 1_000)

    def _crash_behind(self, addr: str) -> bool:
        """The scheduler crashes right after ``addr`` read a ``ComputeTask`` of a key it
        is fetching for local tasks (``flight -> resumed``): the ``FreeKeys`` of those
        tasks, sent right behind it (the scheduler sends them back to waiting in the
        same drain), is lost, and ``SchedulerLost`` frees the key while they still read
        it: ``resumed -> flight``, the one way to that edge (docs/cluster-machine.md).
        False (nothing done) when no such ``ComputeTask`` is on its way, or the run had
        its crash."""
        sim = self.sim
        if self.crashes <= 0:
            return False
        tasks = sim.workers[addr].state.tasks
        freed: set[Any] = set()  # by a FreeKeys ahead of it: no longer reading the key
        for n, msg in enumerate(sim.queues.get(("scheduler", addr), ()), 1):
            if type(msg) is FreeKeys:
                freed.update(msg.keys)
            elif type(msg) is ComputeTask:
                ts = tasks.get(msg.key)
                if (
                    ts is not None and ts.state == "flight" and msg.key not in freed
                    and any(d.key not in freed for d in ts.dependents)
                ):  # fmt: skip
                    self.crashes -= 1
                    TALLY.events["rule:lose_while_fetching/crash"] += 1
                    sim.deliver("scheduler", addr, n)
                    restart_scheduler(sim, TIMEOUT)
                    return True
        return False

    @precondition(lambda self: bool(self.sim.scheduler.steals))
    @rule(i=index, race=st.sampled_from(["finish", "deliver", "start", "victim", "thief"]))
    @guarded
    def steal_race(self, i: int, race: str) -> None:
        """Something crosses a steal request on its way: the victim's queue is delivered
        (``deliver``; ``start``: first its other running tasks end, so a free thread
        starts the task before the request lands, and the victim answers "executing"),
        or it finishes the task, the victim or the thief dies."""
        sim = self.sim
        key = pick(sorted(sim.scheduler.steals, key=repr), i)
        pending = sim.scheduler.steals[key]
        victim, thief = pending.victim, pending.thief
        if race == "start" and victim in sim.workers:
            self._start_before_steal(victim, key)
            sim.deliver("scheduler", victim, 1_000)
        elif race == "deliver" and victim in sim.workers:
            sim.deliver("scheduler", victim, 1_000)
        elif race == "finish" and victim in sim.workers:
            if key in sim.workers[victim].running:
                sim.finish(victim, key)
        elif race == "victim" and victim in sim.workers:
            sim.lose_worker(victim)
        elif race == "thief" and thief in sim.workers:
            sim.lose_worker(thief)

    def _start_before_steal(self, victim: str, key: Any) -> None:
        """Let ``victim`` start ``key`` before the steal request of it lands: deliver
        what is queued ahead of the request one message at a time, ending the victim's
        other runs while they take its threads (at most 20 steps)."""
        sim = self.sim
        w = sim.workers[victim]
        for _ in range(20):
            if key in w.running:
                return
            others = [k for k in w.running if k != key]
            if len(others) >= w.nthreads:
                sim.finish(victim, others[0])
                continue
            q = sim.queues.get(("scheduler", victim), ())
            ahead = next(
                (n for n, m in enumerate(q) if type(m) is StealRequest and m.key == key), 0
            )
            if not ahead:
                if others:
                    sim.finish(victim, others[0])
                    continue
                return
            sim.deliver("scheduler", victim, 1)

    @precondition(lambda self: bool(self.sim.workers) and self.faults > 0)
    @rule(i=index)
    @guarded
    def reregister(self, i: int) -> None:
        """The worker's process dies and a new one registers at the same address."""
        self.faults -= 1
        self.sim.reregister(pick(sorted(self.sim.workers), i))

    @precondition(lambda self: self.restarts > 0)
    @rule(dead=st.lists(index, max_size=2))
    @guarded
    def restart_scheduler(self, dead: list[int]) -> None:
        """The scheduler process crashes (kill -9: whatever was in flight to or from it is
        lost) and starts again from its log (issue 18, ``core/sim_restart.py``); the
        workers ``dead`` picks died with it, the others and the clients come back."""
        self.restarts -= 1
        workers = sorted(self.sim.workers)
        gone = {pick(workers, i) for i in dead} if workers and self.faults > 0 else set()
        if gone:
            self.faults -= 1
            self.awaited = True
        restart_scheduler(self.sim, TIMEOUT, gone)

    @rule(kind=st.sampled_from(["tick", "tick", "heartbeat", "advance"]), i=index,
          seconds=st.sampled_from([0.3, TIMEOUT / 2, 2 * TIMEOUT]))  # fmt: skip
    @guarded
    def clock(self, kind: str, i: int, seconds: float) -> None:
        """``tick``: the scheduler's periodic tick (work stealing; workers not heard from
        within ``worker_timeout`` are removed); ``heartbeat``: a worker says it is alive;
        ``advance``: time passes."""
        sim = self.sim
        if kind == "tick":
            sim.tick()
        elif kind == "heartbeat" and sim.workers:
            sim.heartbeat(pick(sorted(sim.workers), i))
        elif kind == "advance":
            sim.advance(seconds)

    @precondition(lambda self: bool(self.sim.pending_writes()))
    @rule(i=index, j=index)
    @guarded
    def fail_spill(self, i: int, j: int) -> None:
        """A spill file cannot be written: the value stays in RAM for good."""
        addr = pick(self.sim.pending_writes(), i)
        self.sim.fail_spill(addr, pick(list(self.sim.workers[addr].writing), j))

    @precondition(lambda self: bool(self.sim.workers) and self.faults > 0)
    @rule(i=index)
    @guarded
    def retire_worker(self, i: int) -> None:
        self.faults -= 1
        self.sim.retire_worker(pick(list(self.sim.workers), i))

    @precondition(lambda self: any(w.memory_limit for w in self.sim.workers.values()))
    @rule(i=index, level=st.sampled_from([0, 1500, 1700, 3000]))
    @guarded
    def memory_pressure(self, i: int, level: int) -> None:
        """The memory monitor: above spill (1400) spill, above pause (1600) pause."""
        addr = pick(list(self.sim.workers), i)
        if self.sim.workers[addr].memory_limit or not level:
            self.sim.measure_memory(addr, level)
