"""Every promise the worker core makes, as assertions over a ``WorkerState``.

Tests (and ``WorkerState(validate=True)``) call ``validate_worker`` after every event, so a
broken promise fails at the event that broke it, not thousands of events later. It is
O(tasks) and meant for tests and debugging, never for the hot path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trioscheduler.core.worker_transitions import RUNNING_STATES, is_active

if TYPE_CHECKING:
    from trioscheduler.core.worker import WorkerState
    from trioscheduler.core.worker_task import WorkerTask

WORKER_STATES = frozenset(
    {
        "released", "waiting", "fetch", "flight", "missing", "ready", "constrained",
        "executing", "long-running", "memory", "error", "cancelled", "resumed",
    }
)  # fmt: skip


def _holds_thread(ts: WorkerTask) -> str | None:
    """``"executing"``/``"long-running"`` if a thread runs ``ts``, else None."""
    if ts.state in RUNNING_STATES:
        return ts.state
    if ts.state in ("cancelled", "resumed") and ts.previous in RUNNING_STATES:
        return ts.previous
    return None


def _in_transfer(ts: WorkerTask) -> bool:
    return ts.state == "flight" or (
        ts.state in ("cancelled", "resumed") and ts.previous == "flight"
    )


def validate_worker(ws: WorkerState) -> None:
    """Raise ``AssertionError`` naming the first broken promise."""
    tasks = ws.tasks
    executing: set[WorkerTask] = set()
    long_running: set[WorkerTask] = set()
    memory_keys = set()
    held: dict[str, float] = {}
    queued = {peer: {e[2] for e in heap} for peer, heap in ws._fetch_by_peer.items()}
    for key, ts in tasks.items():
        st = ts.state
        assert ts.key == key, (key, ts)
        assert st in WORKER_STATES, f"{ts}: unknown state"
        thread = _holds_thread(ts)
        if thread == "executing":
            executing.add(ts)
        elif thread == "long-running":
            long_running.add(ts)
        if thread and ts.resources:
            for r, q in ts.resources.items():
                held[r] = held.get(r, 0.0) + q
        if st in ("cancelled", "resumed"):
            assert ts.previous in ("executing", "long-running", "flight"), ts
            assert (st == "resumed") == (ts.next is not None), ts
            if st == "resumed":
                assert ts.next == ("waiting" if ts.previous == "flight" else "fetch"), ts
        else:
            assert ts.previous is None and ts.next is None, (ts, ts.previous, ts.next)
        if st == "memory":
            memory_keys.add(key)
        if st in ("ready", "constrained", "executing") or thread:
            for dep in ts.dependencies:
                assert dep.state == "memory", f"{ts} runs before its input {dep}"
        if st == "waiting":
            absent = {d for d in ts.dependencies if d.state != "memory"}
            assert ts.waiting_for_data == absent, (ts, ts.waiting_for_data, absent)
            assert absent, f"{ts} waits for nothing"
        elif st != "resumed":
            assert not ts.waiting_for_data, (ts, ts.waiting_for_data)
        if st in ("fetch", "flight", "missing"):
            assert ws.address not in ts.who_has, ts
        if st == "fetch":
            assert ts.who_has, f"{ts} has nobody to fetch from"
            assert any(ts in queued.get(p, ()) for p in ts.who_has), (
                f"{ts} is not queued for any holder"
            )
        if _in_transfer(ts):
            peer = ts.coming_from
            assert peer is not None and ts in ws.in_flight.get(peer, ()), ts
        else:
            assert ts.coming_from is None, ts
        active = is_active(ts)
        for dep in ts.dependencies:
            assert tasks.get(dep.key) is dep, f"{ts} depends on forgotten {dep}"
            assert (ts in dep.dependents) == active, (ts, dep, active)
        for dt in ts.dependents:
            assert ts in dt.dependencies and is_active(dt), (ts, dt)
        if st == "released":
            assert ts.dependents, f"{ts} is released but kept"
        assert (ts.pending_compute is not None) == (st == "resumed" and ts.next == "waiting"), ts
    # index sets agree with the states
    assert ws.executing == executing, (ws.executing, executing)
    assert ws.long_running == long_running, (ws.long_running, long_running)
    assert len(ws.executing) <= ws.nthreads + ws.prefetch, "more tasks running than slots"
    assert ws.missing == {ts for ts in tasks.values() if ts.state == "missing"}, ws.missing
    flight_seen: set[WorkerTask] = set()
    for peer, batch in ws.in_flight.items():
        assert batch, f"empty transfer from {peer}"
        for ts in batch:
            assert ts not in flight_seen, f"{ts} in two transfers"
            flight_seen.add(ts)
            assert tasks.get(ts.key) is ts and _in_transfer(ts) and ts.coming_from == peer, ts
    assert len(ws.in_flight) <= ws.transfer_incoming_count_limit, "too many transfers"
    assert ws.in_flight_bytes.keys() == ws.in_flight.keys(), (ws.in_flight_bytes, ws.in_flight)
    assert ws.transfer_incoming_bytes == sum(ws.in_flight_bytes.values()), "bytes in flight"
    limit = ws.transfer_incoming_bytes_limit
    if limit is not None and ws.transfer_incoming_bytes > limit:
        # past the limit only by one key fetched alone
        assert [len(b) for b in ws.in_flight.values()] == [1], ("past the bytes limit", ws.in_flight_bytes)
    for name, heap in (("ready", ws._ready), ("constrained", ws._constrained)):
        in_heap = {e[2] for e in heap if e[2].state == name}
        want = {ts for ts in tasks.values() if ts.state == name}
        assert in_heap == want, (name, in_heap ^ want)
    for e in ws._ready_consumers:  # a preference only: a live entry is a ready task
        if e[2].state == "ready":
            assert tasks.get(e[2].key) is e[2], ("ready consumer forgotten", e[2])
    # resources
    for r, total in ws.total_resources.items():
        avail = ws.available_resources.get(r, 0.0)
        assert abs(total - held.get(r, 0.0) - avail) < 1e-9, (r, total, held, avail)
        assert avail >= -1e-9, (r, avail)
    # memory
    assert not (ws.in_memory & ws.spilled), ws.in_memory & ws.spilled
    assert ws.in_memory | ws.spilled == memory_keys, (ws.in_memory, ws.spilled, memory_keys)
    assert ws.memory_bytes == sum(tasks[k].nbytes for k in ws.in_memory), "memory bytes"
    assert ws.spilled_bytes == sum(tasks[k].nbytes for k in ws.spilled), "spilled bytes"
    assert ws.managed_bytes == ws.memory_bytes + ws.spilled_bytes, "managed bytes"
    # pending spill writes: spilled keys only, booked at their current size
    for k, n in ws.writing.items():
        assert k in ws.spilled, f"a pending write for {k!r}, which is not spilled"
        assert tasks[k].nbytes == n, ("pending write size", k, n, tasks[k].nbytes)
    assert ws.writing_bytes == sum(ws.writing.values()), "writing bytes"
    lru_want = {k for k in ws.in_memory if tasks[k].spillable}
    assert set(ws._lru) == lru_want, set(ws._lru) ^ lru_want
    for k, n in ws._lru.items():
        assert tasks[k].nbytes == n, (k, n)
    assert ws.status in ("running", "paused"), ws.status
    if ws.status == "paused":
        assert ws._starts == 0, "a paused worker started a task or a transfer"
