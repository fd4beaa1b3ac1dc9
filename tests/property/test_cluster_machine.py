"""A whole cluster over the pure cores, driven by hypothesis (``RuleBasedStateMachine``).

The machine owns a ``ClusterSimulator`` (one scheduler core, a changing set of worker
cores, FIFO queues per (sender, receiver) pair) and interleaves every kind of step:
clients join and leave (mid-graph), submit random DAGs (restrictions, resources,
retries, tasks built to fail), maps over one input (root-ish, queued), the same keys
again, scatter data (new keys, or the right value of a submitted task, also to a worker
fetching it, or to a worker whose drop of it is still being told), release (or fire
and forget), cancel and retry keys; messages are
delivered from any non-empty queue; running tasks finish, fail, secede or reschedule;
transfers complete or fail; spill files finish being written (``SpillWritten``: until
then a worker past its write-ahead starts no task) or fail (``SpillFailed``); workers
join, die (with or without their unsent messages; mid-transfer; holding data a task
needs; crossing a steal), restart at their address, retire, come under memory pressure,
send heartbeats; time passes; the scheduler ticks (work stealing, heartbeat timeouts); a
key is cancelled and submitted again while its old run or transfer goes on
(``rerun_moving``: ``cancelled``, ``resumed``), a run or transfer straggles, a transfer
fails. Root-task queuing is on with a tight or default saturation, or off (``inf``),
per run. After every step both cores' invariants hold and each simulated shell agrees
with its core. At teardown faults stop, everything runs to completion, and
every key a client still wants must be in memory with the value a direct evaluation of
the DAG gives (or erred, when its lineage was built to fail or a worker was lost). The
simulator's run oracle (``core/sim_oracle.py``) checks the runs themselves after every
step; ``test_cluster_machine`` then checks which table edges the runs took
(``machine_coverage.py``, ``docs/cluster-machine.md``).

Choices among the current queues, tasks and workers are drawn as integers taken modulo
the number of candidates, so failures shrink toward "the first one". Every shrunk
failure becomes a named test in ``test_regressions.py``.

Profiles: ``--hypothesis-profile=ci`` (~380 runs, ~61 CPU-s) and ``long`` (``nox -s property``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from machine_coverage import Tally, as_dict

from trioscheduler.core.messages import ComputeTask, FreeKeys, MissingData, ReleaseWorkerData
from trioscheduler.core.sim_restart import record_scheduler, restart_scheduler
from trioscheduler.core.simulator import ALWAYS, ClusterSimulator, SimTask

TALLY = Tally()

NAMES = ["alpha", "beta"]
CLIENTS = ["c0", "c1", "c2"]
MAX_WORKERS = 5
# Keys a run may submit: the few runs that submit in most of their steps (and have one
# worker) spent most of the profile's CPU settling hundreds of tasks at the end.
MAX_KEYS = 250
MAX_FAULTS = 4
AIMED_FAULTS = 2
STEP_KINDS = ["deliver"] * 6 + ["finish"] * 3 + ["gather"] * 2 + ["writes", "secede", "reschedule", "round"]
MOVING = frozenset(
    {"executing", "long-running", "flight", "fetch", "missing", "cancelled", "resumed"}
)
FORGET_FROM = 192  # ``release``: an index at least this (a quarter) fires and forgets
SCATTER_OVER = ["processing", "waiting", "no-worker", "queued", "erred", "memory"]
TIMEOUT = 1.0  # worker_timeout of the runs that time workers out
MEMORY_LIMIT = 2000  # small: target 1200, spill 1400, pause 1600 bytes
# The Active Memory Manager's interval (0: every tick, the default since the
# scatter-over-a-rescheduled-task race was fixed; "off": never). A setting, not a draw:
# another draw would move every run of the derandomized ci profile elsewhere.
_AMM = os.environ.get("TRIOSCHEDULER_MACHINE_AMM", "0")
AMM_INTERVAL = None if _AMM == "off" else float(_AMM)

F = TypeVar("F", bound=Callable[..., Any])


def guarded(fn: F) -> F:
    """Mark the machine broken while ``fn`` runs: teardown skips the final checks after a
    failed step, so hypothesis shrinks the original error, not a follow-up one."""

    name = f"rule:{fn.__name__}"

    @functools.wraps(fn)
    def wrapper(self: ClusterMachine, *args: Any, **kwargs: Any) -> Any:
        TALLY.events[name] += 1
        self.ok = False
        result = fn(self, *args, **kwargs)
        self.ok = True
        return result

    return wrapper  # type: ignore[return-value]


def pick(items: list[Any], i: int) -> Any:
    return items[i % len(items)]


index = st.integers(0, 255)

task_attrs = st.fixed_dictionaries(
    {
        "nbytes": st.sampled_from([100, 10, 700]),
        # mostly tasks that succeed: a failing task ends the lineage above it
        "fail": st.sampled_from([0] * 9 + [1, 2, ALWAYS]),
        "retries": st.integers(0, 2),
        "where": st.sampled_from([None, None, None, "alpha", "beta"]),
        "loose": st.booleans(),
        "gpu": st.sampled_from([False, False, False, True]),
        "priority": st.integers(0, 2),
        "wanted": st.booleans(),
        "deps": st.lists(index, max_size=3),
        # tasks of one big group reading a few scattered keys are root-ish (queued)
        "prefix": st.sampled_from(["inc", "inc", "map"]),
    }
)


class ClusterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sim = ClusterSimulator(validate=True, tally=True)
        self.n_keys = 0
        self.n_scattered = 0
        self.faults = 0  # workers this run may still kill, re-register or retire
        self.aimed = 0  # ... and kill at a chosen moment (holding data others need)
        self.races = 0  # ... and kill mid-transfer or mid-rerun (``resumed``)
        self.restarts = 0  # scheduler crashes this run may still have
        self.crashes = 0  # ... and crashes right behind a ComputeTask (``_crash_behind``)
        self.client_restarts = 1  # Client.restart's cancellation: at most once a run
        self.awaited = False  # a worker died with the scheduler: its grace must run out
        self.ok = True

    # ------------------------------------------------------------------ set-up

    @initialize(n=st.integers(1, 3), saturation=st.sampled_from([math.inf, 0.5, 1.0, 1.1]),
                backlog=st.sampled_from([0.0, 0.0, 0.05]), allowed_failures=st.integers(1, 3),
                timeout=st.sampled_from([TIMEOUT, 1e9]), faults=st.integers(1, MAX_FAULTS))  # fmt: skip
    @guarded
    def start(
        self, n: int, saturation: float, backlog: float, allowed_failures: int, timeout: float,
        faults: int,
    ) -> None:
        """``saturation``/``backlog``: root-task queuing off (inf), tight (a worker takes
        one root task per thread or fewer), or as by default. ``allowed_failures``: how
        many workers a task may see die before it errs (``KilledWorker``); ``timeout``:
        how long a worker may stay silent before a ``Tick`` removes it. ``faults``: how
        many workers the run may kill, re-register or retire (hypothesis draws those
        rules as often as any other; unbounded, they leave too little to interleave)."""
        self.faults = faults
        self.aimed = AIMED_FAULTS
        self.races = AIMED_FAULTS + 2
        self.restarts = 1
        self.crashes = 1
        self.sim = ClusterSimulator(
            validate=True, tally=True, worker_saturation=saturation, worker_backlog=backlog,
            allowed_failures=allowed_failures, worker_timeout=timeout,
            amm_interval=AMM_INTERVAL,
        )  # fmt: skip
        record_scheduler(self.sim)  # its log, for restart_scheduler
        for i in range(n):
            if i < len(NAMES):
                self.sim.add_worker(name=NAMES[i], nthreads=2, resources={"GPU": 1.0})
            else:
                self.sim.add_worker(nthreads=2)

    # ------------------------------------------------------------------ clients

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
        found = [f for f in found if f[1] in sim.graph and not flags[f[1]][1]]
        found = [f for f in found if f[2] == kind] or found
        tasks = sim.scheduler.tasks
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
        known, and none of the ~100 MissingData of a ci run (2026-12-06) named one, so
        the ci profile does not catch ``missing-data-no-free`` yet."""
        self.scatter_over_drop(client, i, "missing")

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

    # ------------------------------------------------------------------ messages and work

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

    # ------------------------------------------------------------------ workers

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
    @rule(i=index, race=st.sampled_from(["finish", "deliver", "victim", "thief"]))
    @guarded
    def steal_race(self, i: int, race: str) -> None:
        """Something crosses a steal request on its way: the victim starts the task (its
        queue delivered) or finishes it, the victim or the thief dies."""
        sim = self.sim
        key = pick(sorted(sim.scheduler.steals, key=repr), i)
        pending = sim.scheduler.steals[key]
        victim, thief = pending.victim, pending.thief
        if race == "deliver" and victim in sim.workers:
            sim.deliver("scheduler", victim, 1_000)
        elif race == "finish" and victim in sim.workers:
            if key in sim.workers[victim].running:
                sim.finish(victim, key)
        elif race == "victim" and victim in sim.workers:
            sim.lose_worker(victim)
        elif race == "thief" and thief in sim.workers:
            sim.lose_worker(thief)

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

    # ------------------------------------------------------------------ checks

    @invariant()
    @guarded
    def consistent(self) -> None:
        self.sim.check()

    def teardown(self) -> None:
        if not self.ok:
            return
        if self.awaited:  # the grace for workers that died with the scheduler runs out
            self.sim.advance(2 * TIMEOUT)
            self.sim.tick()
        problems = self.sim.settle(max_rounds=2_000)
        taken = TALLY.add_run(self.sim)
        event("scheduler edges taken in a run", taken["scheduler"])
        event("worker edges taken in a run", taken["worker"])
        assert not problems, "\n".join(problems)


def _register_work(weight: int) -> None:
    body = guarded(ClusterMachine.work)
    for n in range(weight):

        def work_n(self: ClusterMachine, step: tuple[str, int, int, bool]) -> None:
            body(self, step)

        work_n.__name__ = work_n.__qualname__ = f"work_{n}"
        strategy = st.tuples(st.sampled_from(STEP_KINDS), index, st.integers(1, 4), st.booleans())
        setattr(ClusterMachine, work_n.__name__, rule(step=strategy)(work_n))


WORK_WEIGHT = 6
_register_work(WORK_WEIGHT)
# The rules aimed at the cancelled/resumed family, drawn twice as often as the rest: each
# run reaches a few of those interleavings, and the ci profile must reach them all.
ClusterMachine.rerun_moving_again = ClusterMachine.rerun_moving  # type: ignore[attr-defined]
ClusterMachine.lose_source_again = ClusterMachine.lose_source  # type: ignore[attr-defined]
ERRANT_WEIGHT = 4
for _n in range(1, ERRANT_WEIGHT):
    setattr(ClusterMachine, f"scatter_to_errant_{_n}", ClusterMachine.scatter_to_errant)


# Examples are cheap (a few ms per step): run EXAMPLES_PER_PROFILE_EXAMPLE of them for
# each example the profile asks for (ci: 50 -> ~380 runs of up to 200 steps, ~57 CPU-s;
# 8 took ~68 CPU-s with the aimed rules: 7 keeps ci under main's 65 CPU-s of before them).
EXAMPLES_PER_PROFILE_EXAMPLE = 7
STEPS = 200
# Share of the reachable edges of each table a profile must take (other profiles: report).
# ci: 90% of each (the worker's table at 47 of 49 on 2026-12-06, docs/cluster-machine.md).
REQUIRED_COVERAGE = {
    "ci": {"scheduler": 0.9, "worker": 0.9},
    "long": {"scheduler": 1.0, "worker": 1.0},
}
_REPORT_PATH = os.environ.get("TRIOSCHEDULER_COVERAGE_REPORT")
REPORT = Path(_REPORT_PATH) if _REPORT_PATH else None


def test_cluster_machine(request: pytest.FixtureRequest) -> None:
    """Run the machine; then the edges it took: every reachable edge in the long
    profile, REQUIRED_COVERAGE of them in ci (``-rP`` or ``-s`` prints the report;
    ``TRIOSCHEDULER_COVERAGE_REPORT=path`` writes it as JSON)."""
    TALLY.reset()
    run_state_machine_as_test(
        ClusterMachine,
        settings=settings(
            max_examples=settings().max_examples * EXAMPLES_PER_PROFILE_EXAMPLE,
            stateful_step_count=STEPS,
        ),
    )
    print(TALLY.report())
    if REPORT is not None:
        REPORT.write_text(json.dumps(as_dict(TALLY), indent=1, default=str))
    assert not any(TALLY.unknown().values()), f"moves outside the tables: {TALLY.unknown()}"
    need = REQUIRED_COVERAGE.get(request.config.getoption("hypothesis_profile", None) or "")
    if need is None:
        return
    fraction = TALLY.fraction()
    missed = TALLY.missed()
    for core, got in fraction.items():
        assert got >= need[core], (
            f"the machine took {got:.0%} of the {core}'s reachable edges (needs "
            f"{need[core]:.0%}); never taken: {missed[core]}"
        )


# ---------------------------------------------------------------------- the oracle itself


def test_oracle_accepts_a_clean_run_with_losses_and_recomputation() -> None:
    sim = ClusterSimulator(validate=True)
    a = sim.add_worker(nthreads=2)
    sim.add_worker(nthreads=2)
    tasks = [SimTask("x"), SimTask("y", ["x"]), SimTask("z", ["x", "y"])]
    sim.submit("c", tasks, ["z", "x"])
    sim.run_to_completion()
    sim.lose_worker(a)  # whatever it held is recomputed from lineage
    assert not sim.settle()
    assert sim.scheduler.tasks["z"].state == "memory"


def test_oracle_catches_a_wrong_value() -> None:
    sim = ClusterSimulator()
    sim.add_worker()
    sim.submit("c", [SimTask("x"), SimTask("y", ["x"])], ["y"])
    sim.run_to_completion()
    (w,) = sim.workers.values()
    w.data["y"] += 1  # a corrupted result
    assert any("expected" in p for p in sim.check_outcome())


def test_oracle_catches_an_unjustified_error_and_a_stuck_task() -> None:
    sim = ClusterSimulator()
    sim.add_worker()
    sim.submit("c", [SimTask("x", fail_attempts=1, retries=1)], ["x"])
    sim.run_to_completion()
    assert not sim.check_outcome()  # failed once, retried, done
    sim.submit("c", [SimTask("never", fail_attempts=ALWAYS)], ["never"])
    sim.run_to_completion()
    assert not sim.check_outcome()  # erred, as the graph asked
    sim.submit("c", [SimTask("pinned", workers=["nobody"])], ["pinned"])
    sim.run_to_completion()
    assert any("no-worker" in p for p in sim.check_outcome())
