"""What a worker starts next: tasks on free threads, transfers from idle peers.

Run by ``WorkerState.handle`` once after each batch of events, on the state the batch
left. Both are pure: they pop queue entries, move tasks through the table
(``-> executing``, ``-> flight``) and append the instructions (``Execute``, ``GatherDep``).
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, Any

from trioscheduler.core.messages import GatherDep, Key
from trioscheduler.core.worker_task import DEFAULT_NBYTES, HeapEntry, WorkerTask
from trioscheduler.core.worker_transitions import transition

if TYPE_CHECKING:
    from trioscheduler.core.worker import WorkerState


def next_ready(ws: WorkerState) -> list[HeapEntry] | None:
    """The queue whose head is the task to start next (dask's ``_next_ready_task``), or
    None when nothing can start. Stale heads (tasks no longer in the queue's state) are
    dropped on the way.

    Above the memory target a task that reads data goes first, before any new root task
    adds more (what it reads can then be released); else the best priority of ``ready``
    and ``constrained``, a constrained task only while its resources are free.
    """
    consumers = ws._ready_consumers
    target = ws.thresholds.target
    if consumers and target is not None and ws.managed_bytes > target:
        while consumers and consumers[0][2].state != "ready":
            heapq.heappop(consumers)
        if consumers:
            return consumers
    ready = ws._ready
    constrained = ws._constrained
    while ready and ready[0][2].state != "ready":
        heapq.heappop(ready)
    while constrained and constrained[0][2].state != "constrained":
        heapq.heappop(constrained)
    if constrained and (not ready or constrained[0] < ready[0]):
        if resources_free(ws, constrained[0][2]):
            return constrained
    return ready or None


def ensure_computing(ws: WorkerState, stim: str, now: float, out: list[Any]) -> None:
    """Start ready tasks, best priority first, while slots, resources and the spill
    writer's backlog allow.

    With ``prefetch``, up to that many more start beyond the thread slots, each as an
    ``Execute`` with ``behind`` set: the shell queues it for the next thread that frees,
    so a thread goes from one short task to the next without waiting for the loop to
    handle each completion (a loop round trip per task with one thread), and the loop
    handles the completions in batches. Only plain ready tasks (no resources) are
    prefetched, and only while the estimated durations of all tasks executing and
    queued, the new one included, add up to ``prefetch_duration`` seconds per thread or
    less: a prefetched task can no longer be stolen, so it must not wait long.
    """
    if ws.status != "running":
        return
    executing = ws.executing
    nthreads = ws.nthreads
    most = ws.max_executing
    goal = ws._spill_goal
    write_ahead = ws.thresholds.write_ahead
    started: list[WorkerTask] = []  # their inputs are kept from spilling (if it comes to that)
    handed = -1.0  # estimated seconds of work handed to the threads (once prefetching)
    while len(executing) < most:
        heap = next_ready(ws)
        if heap is None:
            return
        ts = heap[0][2]
        if len(executing) >= nthreads:
            if handed < 0.0:
                handed = sum([t.duration for t in executing])
            handed += ts.duration
            if ts.resources or handed > ws.prefetch_duration * nthreads:
                return
        if write_ahead is not None and ws.writing_bytes > write_ahead:
            if writes_behind(ws, ts, write_ahead):
                return  # wait for ``SpillWritten`` (tasks started above may have spilled)
        heapq.heappop(heap)
        transition(ws, ts, "executing", stim, now, out)
        ws._starts += 1
        if ts.dependencies:  # (every consumer has some)
            started.append(ts)
            if goal is not None and ws.memory_bytes > goal:
                # never push out what a task started by this event is about to read
                ws._spill_to_target(out, _inputs_of(started))


def writes_behind(ws: WorkerState, ts: WorkerTask, write_ahead: int) -> bool:
    """More than ``write_ahead`` bytes would still be unwritten once ``ts`` starts.

    Starting ``ts`` brings back its spilled inputs, which ends their pending writes:
    a task waiting only for the writes of its own inputs starts at once, rather than
    after its inputs went to disk and back.
    """
    behind = ws.writing_bytes
    writing = ws.writing
    for dep in ts.dependencies:
        n = writing.get(dep.key)
        if n is not None:
            behind -= n
    return behind > write_ahead


def resources_free(ws: WorkerState, ts: WorkerTask) -> bool:
    avail = ws.available_resources
    assert ts.resources is not None
    return all(avail.get(r, 0.0) >= q for r, q in ts.resources.items())


def ensure_communicating(ws: WorkerState, stim: str, now: float, out: list[Any]) -> None:
    """Start transfers from idle peers, best-priority key first, bundled per peer.

    One ``GatherDep`` per peer at a time (so a peer's answer is unambiguous and no
    peer is flooded): a key is fetched from whichever of its holders is idle, which
    spreads the load over holders. Ties break on the address, so it is deterministic.

    With a ``transfer_incoming_bytes_limit`` (dask's ``_task_exceeds_transfer_limits``)
    no key is asked for that would take the bytes in flight past it, except one key when
    nothing is in flight; the best-priority key that does not fit waits for room rather
    than let smaller, later keys overtake it.
    """
    if ws.status != "running":
        return
    ws._fetch_dirty = False
    free = ws.transfer_incoming_count_limit - len(ws.in_flight)
    if free <= 0:
        return
    bytes_limit = ws.transfer_incoming_bytes_limit
    incoming = ws.transfer_incoming_bytes
    if bytes_limit is not None and incoming and incoming >= bytes_limit:
        return
    by_peer = ws._fetch_by_peer
    in_flight = ws.in_flight
    candidates: list[tuple[tuple[Any, ...], int, str]] = []
    for peer, heap in list(by_peer.items()):
        if peer in in_flight:
            continue
        while heap and not _fetchable(heap[0][2], peer):
            heapq.heappop(heap)
        if not heap:
            del by_peer[peer]
            continue
        candidates.append((heap[0][0], heap[0][1], peer))
    candidates.sort()
    limit = ws.transfer_message_bytes_limit
    for _, _, peer in candidates:
        heap = by_peer[peer]
        keys: list[Key] = []
        total = 0
        full = False  # the next key would pass the bytes limit
        while heap:
            ts = heap[0][2]
            if not _fetchable(ts, peer):
                heapq.heappop(heap)
                continue
            n = ts.nbytes or DEFAULT_NBYTES
            if keys and total + n > limit:
                break
            if bytes_limit is not None and (keys or incoming) and incoming + total + n > bytes_limit:
                full = True
                break
            heapq.heappop(heap)
            if not keys:
                in_flight[peer] = set()
            keys.append(ts.key)
            total += n
            ts.coming_from = peer
            transition(ws, ts, "flight", stim, now, out)
        if not heap:
            del by_peer[peer]
        if keys:
            out.append(GatherDep(peer, keys, total))
            ws.in_flight_bytes[peer] = total
            incoming += total
            ws._starts += 1
            free -= 1
            if free <= 0:
                break
        if full or (bytes_limit is not None and incoming >= bytes_limit):
            break  # no room for the best key left: it waits for a transfer to end
    ws.transfer_incoming_bytes = incoming


def _inputs_of(started: list[WorkerTask]) -> set[Key]:
    return {d.key for ts in started for d in ts.dependencies}


def _fetchable(ts: WorkerTask, peer: str) -> bool:
    return ts.state == "fetch" and peer in ts.who_has
