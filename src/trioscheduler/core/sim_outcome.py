"""The simulator's checks: each worker shell agrees with its core, and at the end, every
key a client still wants is in memory with the right value (or erred for a reason the
graph or a loss justifies) and nothing is left running."""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any

from trioscheduler.core.errors import KilledWorker
from trioscheduler.core.invariants import validate
from trioscheduler.core.messages import FIRE_AND_FORGET, Key, KeyErred, KeyInMemory
from trioscheduler.core.sim_records import SimulatedFailure, SimulationError, holds_thread
from trioscheduler.errors import TrioSchedulerError

if TYPE_CHECKING:
    from trioscheduler.core.simulator import ClusterSimulator


def check_shells(sim: ClusterSimulator) -> None:
    """Every core's invariants, and that each worker shell agrees with its core."""
    validate(sim.scheduler)
    for addr, w in sim.workers.items():
        ws = w.state
        validate(ws)
        if w.data.keys() != ws.in_memory:
            raise SimulationError(
                f"{addr}: shell holds {sorted(w.data, key=repr)} in RAM, "
                f"core says {sorted(ws.in_memory, key=repr)}"
            )
        if w.writing.keys() != ws.writing.keys():
            raise SimulationError(
                f"{addr}: shell writes {sorted(w.writing, key=repr)} to disk, "
                f"core waits for {sorted(ws.writing, key=repr)}"
            )
        if w.disk.keys() | w.writing.keys() != ws.spilled:
            raise SimulationError(
                f"{addr}: shell holds {sorted(w.disk, key=repr)} on disk "
                f"(and writes {sorted(w.writing, key=repr)}), "
                f"core says {sorted(ws.spilled, key=repr)}"
            )
        threads = {k for k, ts in ws.tasks.items() if holds_thread(ts)}
        if w.running.keys() != threads:
            raise SimulationError(
                f"{addr}: shell runs {sorted(w.running, key=repr)}, "
                f"core has threads for {sorted(threads, key=repr)}"
            )
        flights = {p: {t.key for t in b} for p, b in ws.in_flight.items()}
        if {p: set(ks) for p, ks in w.gathers.items()} != flights:
            raise SimulationError(f"{addr}: shell fetches {w.gathers}, core {flights}")
    if sim.oracle is not None:
        sim.oracle.check(sim)


def check_outcome(sim: ClusterSimulator) -> list[str]:
    """After ``run_to_completion``: what is wrong with the result (empty if nothing).

    Liveness: no task is left computing anywhere. Correctness: every key a client
    still wants is in memory with the value the graph gives it, on every holder, and
    the client was told; or it erred, and the graph asked for that (a task built to
    fail in its lineage) or a worker was lost (``KilledWorker``).
    """
    problems: list[str] = []
    s = sim.scheduler
    flags = sim.failure_flags()
    stuck = {
        k: ts.state for k, ts in s.tasks.items() if ts.state not in ("memory", "erred", "released")
    }
    if stuck:
        problems.append(f"scheduler tasks still not done: {dict(list(stuck.items())[:10])}")
    for addr, w in sim.workers.items():
        ws = w.state
        busy = {k: ts.state for k, ts in ws.tasks.items() if ts.state not in ("memory", "error")}
        if busy:
            problems.append(f"{addr}: tasks still not done: {dict(list(busy.items())[:10])}")
        sws = s.workers.get(addr)
        if sws is not None and sws.status == "closing":
            problems.append(f"{addr}: still retiring (status closing) after everything settled")
        for k in ws.in_memory | ws.spilled:
            sts = s.tasks.get(k)
            if sts is None or sts.state != "memory" or addr not in sts.who_has:
                problems.append(f"{addr} holds {k!r}, which the scheduler does not count")
    for k, ts in s.tasks.items():
        for addr in ts.who_has:
            holder = sim.workers.get(addr)
            if holder is None or not (k in holder.data or k in holder.disk or k in holder.writing):
                problems.append(f"scheduler thinks {addr} holds {k!r}; it does not")
    forgotten = s.clients.get(FIRE_AND_FORGET)
    if forgotten is not None and forgotten.wants:  # each had an outcome: released then
        problems.append(f"fire-and-forget keys still wanted: {sorted(forgotten.wants, key=repr)}")
    for client, wants in sim.wants.items():
        cs = s.clients.get(client)
        have = set(cs.wants) if cs is not None else set()
        if have != wants:
            problems.append(
                f"client {client} wants {sorted(wants, key=repr)}, "
                f"scheduler says {sorted(have, key=repr)}"
            )
        msgs = sim.client_msgs.get(client, {})
        for key in wants:
            problems.extend(check_key(sim, client, key, msgs.get(key), flags))
    return problems


def check_key(
    sim: ClusterSimulator, client: str, key: Key, last: Any, flags: dict[Key, tuple[bool, bool]]
) -> list[str]:
    ts = sim.scheduler.tasks.get(key)
    if ts is None:
        return [f"{client} wants {key!r}, which the scheduler forgot"]
    graph = sim.graph
    doomed, may_fail = flags[key]
    if ts.state == "memory":
        out = []
        if doomed:
            out.append(f"{key!r} in memory, though a task of its lineage always fails")
        want = sim.expected(key)
        for addr in ts.who_has:
            w = sim.workers[addr]
            got = w.data.get(key, w.disk.get(key, w.writing.get(key)))
            if got != want:
                out.append(f"{key!r} on {addr} is {got}, expected {want}")
        if type(last) is not KeyInMemory:
            out.append(f"{client} was not told {key!r} is in memory (last: {last!r:.100})")
        return out
    if ts.state != "erred":
        return [f"{client} wants {key!r}, left in state {ts.state}"]
    out = []
    if type(last) is not KeyErred:
        out.append(f"{client} was not told {key!r} erred (last: {last!r:.100})")
    try:
        exc = pickle.loads(ts.exception or b"")
    except Exception as e:  # noqa: BLE001 - any garbage is a finding
        return [*out, f"{key!r} erred with an unreadable exception: {e!r}"]
    if isinstance(exc, SimulatedFailure):
        if exc.key not in sim.lineage(key) or not graph[exc.key].fail_attempts:
            out.append(f"{key!r} erred blaming {exc.key!r}, not a failing task of its lineage")
        elif not may_fail:
            out.append(f"{key!r} erred though every failure was within its retries")
    elif isinstance(exc, KilledWorker):
        if not sim.lost:
            out.append(f"{key!r} erred with KilledWorker, but no worker was lost")
    elif isinstance(exc, TrioSchedulerError) and "Scatter it again" in str(exc):
        # scattered data lost with the workers that held it (a scatter racing a FreeKeys
        # or a ReleaseWorkerData of the same key is settled by numbered data updates)
        lineage = sim.lineage(key)
        if not any(graph[k].scattered for k in lineage):
            out.append(f"{key!r} erred as lost scattered data, but none is in its lineage")
        elif not sim.lost:
            out.append(f"{key!r} erred as lost scattered data, but no worker was lost")
        else:
            # the scattered key blamed went with a worker that left after it was first
            # scattered (not a value it held before: a computed key scattered later), or
            # a value computed from it, needed again, went with one
            lost = ts.exception_blame if ts.exception_blame is not None else key
            since = sim.departed[sim.departed_before_scatter.get(lost, 0) :]
            computed = {k for k in lineage if k != lost and lost in sim.lineage(k)}
            if not any(lost in held for w in since for held in (w.data, w.disk, w.writing)) and (
                held_by_departed(sim).isdisjoint(computed)
            ):
                out.append(
                    f"{key!r} erred as lost scattered data ({lost!r}), but no worker that "
                    "left since it was first scattered held it, nor one a key computed from it"
                )
    else:
        out.append(f"{key!r} erred with an unexpected {exc!r}")
    return out


def held_by_departed(sim: ClusterSimulator) -> set[Key]:
    """Keys a worker held (in RAM, on disk, being written) when it left the cluster
    (lost, restarted, timed out or retired): only those may have been lost with it."""
    return {k for w in sim.departed for held in (w.data, w.disk, w.writing) for k in held}
