"""The cluster machine's client rules: submit graphs and maps, submit the same keys
again, take and drop futures, cancel, retry, connect and disconnect, scatter (new data,
the value of a submitted key, to a fetcher, over a drop still on its way).

A mixin of ``ClusterMachine`` (``test_cluster_machine.py``); shared parts in
``machine_parts.py``.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule
from machine_parts import (
    CLIENTS,
    FORGET_FROM,
    MAX_KEYS,
    SCATTER_OVER,
    TALLY,
    MachineParts,
    guarded,
    index,
    pick,
    task_attrs,
)

from trioscheduler.core.messages import FreeKeys, MissingData, ReleaseWorkerData
from trioscheduler.core.simulator import ALWAYS, SimTask


class ClientRules(MachineParts):
    @precondition(lambda self: self.n_keys < MAX_KEYS)
    @rule(client=st.sampled_from(CLIENTS), tasks=st.lists(task_attrs, min_size=1, max_size=6),
          reuse=st.lists(index, max_size=2))  # fmt: skip
    @guarded
    def submit(self, client: str, tasks: list[dict[str, Any]], reuse: list[int]) -> None:
        """A DAG of new tasks; they may read keys the client holds futures for."""
        sim = self.sim
        held = sorted(sim.wants.get(client, ()), key=repr)
        existing = [pick(held, i) for i in reuse] if held else []
        new: list[SimTask] = []
        for a in tasks:
            self.n_keys += 1
            kind = "fail" if a["fail"] else a["prefix"]
            key = f"{kind}-{self.n_keys}"
            candidates = [t.key for t in new] + existing
            deps = sorted({pick(candidates, i) for i in a["deps"]}) if candidates else []
            new.append(
                SimTask(
                    key, deps, a["nbytes"], a["fail"], a["retries"],
                    [a["where"]] if a["where"] else None, a["loose"],
                    {"GPU": 1.0} if a["gpu"] else None, a["priority"],
                )
            )  # fmt: skip
        used = {d for t in new for d in t.dependencies}
        wanted = [
            t.key for t, a in zip(new, tasks, strict=True) if a["wanted"] or t.key not in used
        ]
        sim.submit(client, new, wanted)

    @precondition(lambda self: self.n_keys < MAX_KEYS)
    @rule(client=st.sampled_from(CLIENTS), n=st.integers(3, 12),
          fail=st.sampled_from([0, 0, 0, ALWAYS]), scattered=st.booleans())  # fmt: skip
    @guarded
    def submit_map(self, client: str, n: int, fail: int, scattered: bool) -> None:
        """``client.map`` over one input: a source task (or a key the client scattered)
        and ``n`` tasks of one big group reading it. Such tasks are root-ish (dask's
        ``is_rootish``: a big group whose inputs are a few tasks of a tiny group), so with
        queuing on they wait in ``queued``, inputs and all."""
        sim = self.sim
        held = sorted(k for k in sim.wants.get(client, ()) if sim.graph[k].scattered)
        new: list[SimTask] = []
        if scattered and held:
            source = held[-1]
        else:
            self.n_keys += 1
            source = f"src-{self.n_keys}"
            new.append(SimTask(source, [], 100, fail))
        for _ in range(n):
            self.n_keys += 1
            new.append(SimTask(f"map-{self.n_keys}", [source]))
        sim.submit(client, new, [t.key for t in new if t.key != source])

    @precondition(lambda self: bool(self.sim.graph))
    @rule(client=st.sampled_from(CLIENTS), i=index)
    @guarded
    def resubmit(self, client: str, i: int) -> None:
        """A client submits a task it (or another) submitted before, with its lineage:
        the same keys (dask's tokenized keys make a re-run computation look just like
        this). A key the scheduler still knows is just wanted again; a forgotten one is
        computed again, perhaps while its last run still goes on, cancelled, somewhere."""
        sim = self.sim
        graph = sim.graph
        computed = [k for k, t in graph.items() if not t.scattered]
        if not computed:
            return
        key = pick(computed, i)
        lineage = sim.lineage(key)
        if any(graph[k].scattered for k in lineage):
            return  # a lost scattered input cannot be resubmitted, only scattered again
        sim.submit(client, [t for k, t in graph.items() if k in lineage], [key])

    @precondition(lambda self: any(self.sim.wants.values()))
    @rule(client=st.sampled_from(CLIENTS), i=index)
    @guarded
    def desire(self, client: str, i: int) -> None:
        """The client takes a future for a key some client holds."""
        keys = sorted({k for ks in self.sim.wants.values() for k in ks}, key=repr)
        self.sim.desire(client, [pick(keys, i)])

    @precondition(lambda self: any(self.sim.wants.values()))
    @rule(client=st.sampled_from(CLIENTS), i=index, n=st.integers(1, 3))
    @guarded
    def release(self, client: str, i: int, n: int) -> None:
        """The client drops ``n`` of its futures; with ``i`` in its top quarter it first
        hands them to ``fire_and_forget``: the scheduler keeps each key until it has an
        outcome. (Drawn from ``i``, not a draw of its own: a new draw would move every
        later draw of the derandomized ci profile, and its reach with them.)"""
        held = sorted(self.sim.wants.get(client, ()), key=repr)
        if held:
            keys = [pick(held, i + j) for j in range(n)]
            if i >= FORGET_FROM:
                TALLY.events["rule:release/fire_and_forget"] += 1
                self.sim.fire_and_forget(keys)
            self.sim.release(client, keys)

    @precondition(lambda self: any(self.sim.wants.values()))
    @rule(client=st.sampled_from(CLIENTS), i=index, force=st.booleans())
    @guarded
    def cancel(self, client: str, i: int, force: bool) -> None:
        held = sorted(self.sim.wants.get(client, ()), key=repr)
        if held:
            self.sim.cancel(client, [pick(held, i)], force)

    @precondition(lambda self: any(self.sim.wants.values()))
    @rule(client=st.sampled_from(CLIENTS), i=index)
    @guarded
    def retry(self, client: str, i: int) -> None:
        """``client.retry``: only erred keys move (the scheduler ignores the rest)."""
        held = sorted(self.sim.wants.get(client, ()), key=repr)
        if held:
            self.sim.retry(client, [pick(held, i)])

    @precondition(lambda self: any(self.sim.wants.values()))
    @rule(i=index)
    @guarded
    def remove_client(self, i: int) -> None:
        """A client holding futures disconnects (mid-graph: its keys may still run)."""
        holding = sorted(c for c, ks in self.sim.wants.items() if ks)
        self.sim.remove_client(pick(holding, i))

    @precondition(lambda self: self.client_restarts > 0 and any(self.sim.wants.values()))
    @rule(client=st.sampled_from(CLIENTS))
    @guarded
    def restart_clients(self, client: str) -> None:
        """``Client.restart``'s cancellation of every client's keys, mid-graph."""
        self.client_restarts -= 1
        self.sim.restart_clients(client)

    @precondition(lambda self: len(self.sim.wants) < len(CLIENTS))
    @rule(i=index)
    @guarded
    def add_client(self, i: int) -> None:
        """A client connects (before it submits anything)."""
        self.sim.add_client(pick([c for c in CLIENTS if c not in self.sim.wants], i))

    @precondition(lambda self: bool(self.sim.workers))
    @rule(client=st.sampled_from(CLIENTS), i=index, n=st.integers(1, 3),
          known=st.sampled_from([None, *SCATTER_OVER]))  # fmt: skip
    @guarded
    def scatter(self, client: str, i: int, n: int, known: str | None) -> None:
        """``client.scatter``: new data (no lineage), or the right value of a submitted
        task in scheduler state ``known`` under its key (as ``client.scatter({key:
        value})``), which then wins over computing it."""
        sim = self.sim
        key: Any = None
        if known is not None:
            tasks = sim.scheduler.tasks
            flags = sim._failure_flags()
            candidates = sorted(
                (k for k, t in sim.graph.items()
                 if not t.scattered and not flags[k][1] and k in tasks
                 and tasks[k].state == known),
                key=repr,
            )  # fmt: skip
            if candidates:
                key = pick(candidates, i)
        if key is None:
            self.n_scattered += 1
            key = f"scat-{self.n_scattered}"
        addrs = sorted(sim.workers)
        to = [pick(addrs, i + j) for j in range(min(n, len(addrs)))]
        sim.scatter(client, key, to)

    def _sought(self) -> list[tuple[str, Any]]:
        """(worker, key) pairs: a worker looking for data of a task that cannot fail."""
        sim = self.sim
        flags = sim._failure_flags()
        return [
            (a, k) for a, w in sorted(sim.workers.items())
            for k, ts in w.state.tasks.items()
            if ts.state in ("fetch", "missing", "flight") and k in sim.graph and not flags[k][1]
        ]  # fmt: skip

    @precondition(
        lambda self: any(
            ts.state in ("fetch", "missing", "flight")
            for w in self.sim.workers.values() for ts in w.state.tasks.values()
        )
    )  # fmt: skip
    @rule(client=st.sampled_from(CLIENTS), i=index, state=st.sampled_from(["missing", "any"]))
    @guarded
    def scatter_to_fetcher(self, client: str, i: int, state: str) -> None:
        """A client scatters a key to a worker that is fetching (or missing) it;
        ``missing`` prefers a key no holder is known of (a rarer, shorter state)."""
        sought = self._sought()
        if state == "missing":
            workers = self.sim.workers
            sought = [(a, k) for a, k in sought if workers[a].state.tasks[k].state == state] or sought
        if sought:
            addr, key = pick(sought, i)
            self.sim.scatter(client, key, [addr])

    def _dropping(self, kind: str) -> list[tuple[str, Any, str]]:
        """(worker, key, kind): a key a worker is about to drop or has dropped while the
        news is on its way: a ``FreeKeys`` of it queued to the worker (``free``), the
        worker's report of the drop queued to the scheduler (``report``), a peer's
        ``MissingData`` naming the worker (``missing``, the rarest); those of ``kind``
        if any, and among them first the keys the scheduler keeps no lineage of (a copy
        dropped for nothing is then lost, not computed again)."""
        sim = self.sim
        workers = sim.workers
        found: list[tuple[str, Any, str]] = []
        for (src, dst), q in sorted(sim.queues.items()):
            for msg in q:
                t = type(msg)
                if t is FreeKeys and dst in workers:
                    found.extend((dst, k, "free") for k in msg.keys)
                elif t is ReleaseWorkerData and src in workers:
                    found.extend((src, k, "report") for k in msg.keys)
                elif t is MissingData and msg.errant_worker in workers:
                    found.append((msg.errant_worker, msg.key, "missing"))
        flags = sim._failure_flags()
        tasks = sim.scheduler.tasks
        found = [f for f in found if f[1] in sim.graph and not flags[f[1]][1]]
        found = [f for f in found if f[2] == kind] or found
        bare = [f for f in found if f[1] not in tasks or tasks[f[1]].run_spec is None]
        return bare or found

    @precondition(
        lambda self: any(
            t is FreeKeys or t is ReleaseWorkerData or t is MissingData
            for q in self.sim.queues.values() for t in map(type, q)
        )
    )  # fmt: skip
    @rule(client=st.sampled_from(CLIENTS), i=index,
          kind=st.sampled_from(["free", "report", "missing"]))  # fmt: skip
    @guarded
    def scatter_over_drop(self, client: str, i: int, kind: str) -> None:
        """A client scatters a key to a worker whose drop of it (or a peer's report that
        it lacks it) is still on its way (``kind``: see ``_dropping``): the scatter must
        win over the stale free or report, and a stale report must not leave the new
        copy uncounted (hashed keys scattered again, as dask names them). Without this
        rule scatters met those messages too rarely for the ci profile to catch a core
        that let them win (``mutants.py``: the three session-8 mutants)."""
        dropping = self._dropping(kind)
        if dropping:
            addr, key, found = pick(dropping, i)
            took = self.sim.scatter(client, key, [addr])
            TALLY.events[f"scatter-over-drop:{found}{'' if took else ' (declined)'}"] += 1

    @precondition(
        lambda self: any(
            type(m) is MissingData and m.errant_worker in self.sim.workers
            for q in self.sim.queues.values() for m in q
        )
    )  # fmt: skip
    @rule(client=st.sampled_from(CLIENTS), i=index)
    @guarded
    def scatter_to_errant(self, client: str, i: int) -> None:
        """``scatter_over_drop``'s rarest kind on its own: a client scatters a key to the
        worker a peer's ``MissingData`` (on its way) names as lacking it, drawn
        ERRANT_WEIGHT times as often as a rule, at no cost while none is queued. Rare
        indeed: a peer is named only when it said it lacks a key and no other holder is
        known; none of the ~100 MissingData of a ci run named one before
        ``drop_before_fetch`` (session 10)."""
        self.scatter_over_drop(client, i, "missing")

    def _fetch_behind_free(self) -> list[tuple[str, str, Any, int]]:
        """(fetcher, holder, key, n): a transfer of ``key`` from the holder to the fetcher
        is in flight while a ``FreeKeys`` of it, the ``n``-th message queued to the
        holder, is on its way there; first those whose fetcher knows no other holder (it
        then asks the scheduler, naming the holder)."""
        sim = self.sim
        workers = sim.workers
        found: list[tuple[bool, str, str, Any, int]] = []
        for addr, w in sorted(workers.items()):
            for peer, keys in w.gathers.items():
                q = sim.queues.get(("scheduler", peer))
                if not q or peer not in workers:
                    continue
                fetched = set(keys)
                for n, msg in enumerate(q, 1):
                    if type(msg) is FreeKeys:
                        for k in msg.keys:
                            if k in fetched:
                                fetched.discard(k)
                                ts = w.state.tasks.get(k)
                                only = ts is not None and set(ts.who_has) <= {peer}
                                found.append((only, addr, peer, k, n))
        found.sort(key=lambda f: (f[1], f[2], repr(f[3])))
        only = [f for f in found if f[0]] or found
        return [(a, p, k, n) for _, a, p, k, n in only]

    def _only_holder_fetches(self) -> list[tuple[str, str, Any]]:
        """(fetcher, holder, key): a transfer in flight from a live holder of a key the
        fetcher knows no other holder of (if none, any such transfer)."""
        found = []
        workers = self.sim.workers
        for addr, w in sorted(workers.items()):
            for peer, keys in sorted(w.gathers.items()):
                for k in keys if peer in workers else ():
                    ts = w.state.tasks.get(k)
                    found.append((ts is not None and set(ts.who_has) <= {peer}, addr, peer, k))
        only = [f for f in found if f[0]] or found
        return [(a, p, k) for _, a, p, k in only]

    @precondition(
        lambda self: bool(self._fetch_behind_free())
        or (self.drops > 0 and bool(self._only_holder_fetches()))
    )
    @rule(client=st.sampled_from(CLIENTS), i=index, scatter=st.booleans(), numbered=st.booleans())
    @guarded
    def drop_before_fetch(self, client: str, i: int, scatter: bool, numbered: bool) -> None:
        """A fetcher's holder drops its copy before the fetch arrives, and answers that
        it lacks the key: the ``FreeKeys`` queued to the holder lands first, or, with
        none on its way, the holder's process restarts at its address (``drops``, once a
        run). A fetcher that knows no other holder asks the scheduler (``MissingData``
        naming the holder, ``errant_worker``); with ``scatter`` a client at once
        scatters the key to that holder, so the report is stale when it lands: the
        scheduler keeps the new copy (``MissingData.errant_seq``, mutant
        ``missing-data-ignores-seq``), or, the scatter not ``numbered`` (and to the
        fetcher too), uncounts it and must free it there (``missing-data-no-free``). Without this rule no ``MissingData`` of a ci run
        named a holder (session 9: none of ~100). Drawn DROP_WEIGHT times as often as a
        rule, at no cost while no transfer is in flight."""
        sim = self.sim
        behind = self._fetch_behind_free()
        if behind:
            addr, peer, key, n = pick(behind, i)
            sim.deliver("scheduler", peer, n)
            how = "free"
        else:
            if self.drops <= 0:
                return
            self.drops -= 1
            addr, peer, key = pick(self._only_holder_fetches(), i)
            sim.reregister(peer)
            how = "restart"
        if addr not in sim.workers or peer not in sim.workers[addr].gathers:
            return
        sim.gather(addr, peer)
        q = sim.queues.get((addr, "scheduler"), ())
        named = any(type(m) is MissingData and m.errant_worker == peer for m in q)
        TALLY.events[f"drop-before-fetch:{how}{' (named)' if named else ''}"] += 1
        if named and scatter and peer in sim.workers:
            # numbered: the holder alone, so a key without lineage lives or dies by
            # the stale report; not numbered, the report rightly uncounts the holder's
            # copy (and frees it there): the fetcher takes one too
            targets = [peer] if numbered else [peer, addr]
            took = sim.scatter(client, key, targets, numbered=numbered)
            TALLY.events[f"drop-before-fetch:scattered{'' if took else ' (declined)'}"] += 1
