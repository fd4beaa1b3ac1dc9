"""The scheduler's answers to its clients: graphs, scatter, wants, releases, cancels, retries.

Each ``on_*`` function is the handler of one client event type (``SchedulerState.handle``
dispatches to it); it changes client bookkeeping and asks for task state changes through
the table (``scheduler_transitions``), never moving a task itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from trioscheduler.core import recovery, replicas
from trioscheduler.core import scheduler_transitions as tr
from trioscheduler.core.messages import (
    AddClient,
    CancelAll,
    CancelKeys,
    ClientDesiresKeys,
    ClientReleasesKeys,
    Key,
    KeyCancelled,
    RemoveClient,
    RetryKeys,
    UpdateData,
    UpdateGraph,
    WorkerAddr,
)
from trioscheduler.core.scheduler_records import TaskRecord
from trioscheduler.errors import TrioSchedulerError

if TYPE_CHECKING:
    from trioscheduler.core.scheduler import SchedulerState


def on_add_client(s: SchedulerState, ev: AddClient) -> None:
    s.client_record(ev.client).last_seen = ev.now
    if s.recovery is not None:
        recovery.client_back(s, ev.client)


def on_remove_client(s: SchedulerState, ev: RemoveClient) -> None:
    s.drop_client(ev.client)


def on_update_graph(s: SchedulerState, ev: UpdateGraph) -> None:
    cs = s.client_record(ev.client)
    s.generation += 1
    gen = s.generation
    tasks = s.tasks
    new: list[tuple[TaskRecord, Sequence[Key]]] = []
    for spec in ev.tasks:
        ts = tasks.get(spec.key)
        if ts is not None:
            if ts.run_spec is None and spec.run_spec is not None and ts.state == "released":
                ts.run_spec = spec.run_spec
            continue
        ts = s.new_task(spec.key, spec.run_spec, (-spec.priority, gen, spec.order))
        ts.retries = spec.retries
        if spec.workers:
            ts.worker_restrictions = set(spec.workers)
            ts.allow_other_workers = spec.allow_other_workers
        if spec.resources:
            ts.resource_restrictions = dict(spec.resources)
        new.append((ts, spec.dependencies))
    pos = {ts.key: i for i, (ts, _) in enumerate(new)}
    forward = False  # a dependency submitted after its dependent: a cycle is possible
    broken: list[TaskRecord] = []
    for i, (ts, deps) in enumerate(new):
        if not deps:
            continue
        missing: list[Key] = []
        found: dict[Key, None] = {}  # ordered and deduplicated
        key = ts.key
        for dk in deps:
            dts = tasks.get(dk)
            if dts is None or dts is ts:  # unknown, or a task depending on itself
                missing.append(dk)
                continue
            if pos.get(dk, -1) > i:
                forward = True
            found[dk] = None
            tr.add_dependent(dts, key)
        if found:
            ts.dependencies = tuple(found)
        if missing:
            if ts.key in missing:
                why = "itself: a cycle. Check how the graph was built."
            else:
                why = (
                    f"{missing!r}, which the scheduler does not know (never submitted, "
                    "or already released). Keep a future for the dependency, or submit "
                    "it in the same graph."
                )
            tr.stash_error(ts, TrioSchedulerError(f"task {ts.key!r} depends on {why}"))
            broken.append(ts)
    if forward:
        broken.extend(break_cycles(s, [ts for ts, _ in new]))
    for ts in broken:  # before wants are added, so dependents see them erred
        s.transition(ts, "erred")
    for key in ev.keys:
        ts = tasks.get(key)
        if ts is None:
            s.to_client(cs.client, KeyCancelled(key, "not part of the submitted graph"))
            continue
        s.add_want(cs, ts)
    s.drain()
    # tasks of this graph that nothing wants and nothing depends on: drop them
    for ts, _ in new:
        if ts.state == "released" and not ts.wanted_by and not ts.dependents:
            s.recs[ts.key] = "forgotten"


def break_cycles(s: SchedulerState, new: list[TaskRecord]) -> list[TaskRecord]:
    """The tasks of ``new`` that lie on a dependency cycle, each with an error naming
    the cycle (their dependents then err through them). Only new tasks can form one:
    an existing task never gains dependencies. Kahn's algorithm: what cannot be
    ordered is on a cycle or downstream of one; following dependencies from there
    always ends on a cycle."""
    tasks = s.tasks
    indeg = {ts.key: 0 for ts in new}
    for ts in new:
        for dk in ts.dependencies:
            if dk in indeg:
                indeg[ts.key] += 1
    free = [k for k, n in indeg.items() if not n]
    while free:
        for dk in tasks[free.pop()].dependents:
            if dk in indeg:
                indeg[dk] -= 1
                if not indeg[dk]:
                    free.append(dk)
    stuck = {k: None for k, n in indeg.items() if n}  # ordered: deterministic errors
    on_cycle: dict[Key, list[Key]] = {}
    done: set[Key] = set()
    for start in stuck:
        path: list[Key] = []
        at: dict[Key, int] = {}
        k = start
        while k not in at and k not in done:
            at[k] = len(path)
            path.append(k)
            k = next(d for d in tasks[k].dependencies if d in stuck)
        if k in at:  # a new cycle: path[at[k]:]
            cycle = path[at[k] :]
            for c in cycle:
                on_cycle[c] = cycle
        done.update(path)
    out = []
    for k, cycle in on_cycle.items():
        ts = tasks[k]
        i = cycle.index(k)
        loop = " -> ".join(repr(c) for c in [*cycle[i:], *cycle[:i], k])
        tr.stash_error(
            ts,
            TrioSchedulerError(
                f"task {k!r} depends on itself through a cycle: {loop}. "
                "Check how the graph was built."
            ),
        )
        out.append(ts)
    return out


def on_update_data(s: SchedulerState, ev: UpdateData) -> None:
    cs = s.client_record(ev.client)
    seqs: Mapping[WorkerAddr, int] = ev.seqs or {}
    runs: Mapping[WorkerAddr, str] = ev.incarnations or {}
    for key, holders in ev.who_has.items():
        alive = [s.workers[w] for w in holders if _same_run(s, w, runs)]
        if not alive:
            s.log_msg("warning", f"scattered key {key!r} has no live holder; ignored")
            continue
        ts = s.tasks.get(key)
        if ts is None:
            ts = s.new_task(key, None, (0, s.generation, 0))
        nbytes = ev.nbytes.get(key, ts.nbytes)
        replicas.note_scatter(ts, seqs, alive)
        on = ts.processing_on
        if on is not None and on in holders and key not in s.steals:
            # scattered to the worker the task runs on, whose ComputeTask is on its way or
            # answered (a worker that gave the run up declines the data or tells us): the
            # value may yet be dropped there by a FreeKeys sent before this news (a run
            # rescheduled, the key released and submitted again), so keep the run, whose
            # TaskFinished reports the value (or a result, if it was dropped). A copy on
            # another holder wins instead, and the run is freed.
            alive = [ws for ws in alive if ws.address != on]
            if not alive:
                cs.wants.add(key)
                tr.want(ts, cs)
                continue
        if ts.state == "memory":
            s.add_want(cs, ts)
        else:
            s.recs.pop(key, None)
            cs.wants.add(key)
            tr.want(ts, cs)
            if ts.state == "erred":
                s.transition(ts, "released")
                s.recs.pop(key, None)  # its "waiting": the data is here instead
            ts.nbytes = nbytes
            s.transition(ts, "memory", worker=alive[0])
        for ws in alive:
            if ws.address not in ts.who_has:
                tr.add_replica(s, ts, ws)


def _same_run(s: SchedulerState, addr: WorkerAddr, runs: Mapping[WorkerAddr, str]) -> bool:
    """Whether the worker registered at ``addr`` is the run that took the scattered data
    (the one its reply named, if it named one): a worker that restarted at its address
    between the client's ``update_data`` and this report holds none of it."""
    ws = s.workers.get(addr)
    if ws is None:
        return False
    run = runs.get(addr)
    return run is None or ws.incarnation is None or run == ws.incarnation


def on_desires(s: SchedulerState, ev: ClientDesiresKeys) -> None:
    cs = s.client_record(ev.client)
    for key in ev.keys:
        ts = s.tasks.get(key)
        if ts is None:
            s.to_client(cs.client, KeyCancelled(key, "the scheduler does not know this key"))
        elif key in cs.wants:  # asked again (a client reconnecting): the outcome again
            s.tell_outcome(cs, ts)
        else:
            s.add_want(cs, ts)


def on_releases(s: SchedulerState, ev: ClientReleasesKeys) -> None:
    cs = s.clients.get(ev.client)
    if cs is None:
        return
    for key in ev.keys:
        s.drop_want(cs, key)


GRAPH_FIRST_MAX: Final = 16
"""Graphs up to this many tasks go ahead of the releases queued just before them."""


def graph_first(msgs: list[Any]) -> None:
    """Swap, in place, each release followed by a small graph that wants only its own
    tasks and shares no key with the release: ``on_update_graph`` and ``on_releases``
    then commute for what a client can send (its tasks depend on keys it holds; the
    property test in ``tests/property/test_graph_first.py`` feeds both orders).

    The client's link asks before it sends. The usual pair (``submit(...).result()`` in
    a loop: the last future dropped, the next one submitted) is a release and a one-task
    graph; graph first, an in-process scheduler writes the task to its worker before it
    frees, in time its loop would spend polling for the result (``wire.busy_poll``): p50
    0.432 -> 0.386 ms (docs/performance.md, "Session 11"). A shared key (released and
    submitted again, or a dependency of a new task) keeps the order, which then decides
    what the scheduler holds; so does a graph wanting a key it does not compute, whose
    lineage (the scheduler's, not seen here) may need a released key.
    """
    for i in range(len(msgs) - 1):
        release, graph = msgs[i], msgs[i + 1]
        if (
            type(release) is ClientReleasesKeys
            and type(graph) is UpdateGraph
            and len(graph.tasks) <= GRAPH_FIRST_MAX
        ):
            released = set(release.keys)
            own = {spec.key for spec in graph.tasks}
            if (
                own.isdisjoint(released)
                and own.issuperset(graph.keys)
                and all(released.isdisjoint(spec.dependencies) for spec in graph.tasks)
            ):
                msgs[i], msgs[i + 1] = graph, release


def on_cancel_all(s: SchedulerState, ev: CancelAll) -> None:
    for cs in list(s.clients.values()):
        keys = sorted(cs.wants, key=repr)  # a fixed order: replays and the machine agree
        for key in keys:
            if cs.client != ev.client:
                s.to_client(cs.client, KeyCancelled(key, ev.reason))
            s.drop_want(cs, key)


def walk(
    s: SchedulerState, keys: Iterable[Key], neighbours: Callable[[TaskRecord], Sequence[Key]]
) -> Iterator[tuple[TaskRecord, Sequence[Key]]]:
    """Each known task reachable from ``keys`` once, depth first, with the keys to go
    on to (``neighbours``, asked *before* the caller acts on the task)."""
    tasks = s.tasks
    seen: set[Key] = set()
    stack = list(keys)
    while stack:
        key = stack.pop()
        if key in seen:
            continue
        seen.add(key)
        ts = tasks.get(key)
        if ts is None:
            continue
        nxt = neighbours(ts)
        yield ts, nxt
        stack.extend(nxt)


def on_cancel(s: SchedulerState, ev: CancelKeys) -> None:
    """Cancel ``keys`` for the client, and the dependents only it wanted (all, with
    ``force``: for every client)."""
    if ev.client not in s.clients and not ev.force:
        return
    client = ev.client

    def onward(ts: TaskRecord) -> Sequence[Key]:
        wb = ts.wanted_by
        return tuple(ts.dependents) if wb and (ev.force or wb == {client}) else ()

    for ts, _ in walk(s, ev.keys, onward):
        if not ts.wanted_by:
            continue
        for c in sorted(ts.wanted_by) if ev.force else [client]:
            ccs = s.clients.get(c)
            if ccs is None or ts.key not in ccs.wants:
                continue
            s.to_client(c, KeyCancelled(ts.key, "cancelled"))
            s.drop_want(ccs, ts.key)


def on_retry(s: SchedulerState, ev: RetryKeys) -> None:
    """Run erred ``keys`` again, from their erred dependencies up (the roots of the
    failure are retried; dependents follow through ``erred -> waiting``)."""
    tasks = s.tasks

    def erred_deps(ts: TaskRecord) -> Sequence[Key]:
        if ts.state != "erred":
            return ()
        return [d for d in ts.dependencies if tasks[d].state == "erred"]

    for ts, nxt in walk(s, ev.keys, erred_deps):
        if ts.state == "erred" and not nxt:
            s.recs[ts.key] = "waiting"
