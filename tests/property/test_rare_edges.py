"""The rarest table edges, each reached by a named, deterministic path.

The cluster machine (``test_cluster_machine.py``) must take every reachable edge in its
long profile; an edge that needs an unusual interleaving is first reached here by hand,
through the same ``ClusterSimulator`` steps, to show that it is reachable and which steps
lead to it (the machine's aimed rules then reproduce those steps). Each test also settles
the cluster and checks the outcome: the edge must leave the cluster correct.
"""

from __future__ import annotations

from trioscheduler.core.messages import ComputeTask, FreeKeys
from trioscheduler.core.sim_restart import record_scheduler, restart_scheduler
from trioscheduler.core.simulator import ClusterSimulator, SimTask


def moves(sim: ClusterSimulator, addr: str, key: str) -> list[tuple[str, str]]:
    """The worker's story of ``key``: its ``(start, finish)`` moves, oldest first."""
    story = sim.workers[addr].state._story
    return [(a, b) for k, a, b in zip(story.keys, story.starts, story.finishes, strict=True) if k == key]


def test_resumed_to_flight_needs_a_scheduler_crash_between_a_compute_and_its_free() -> None:
    """``resumed -> flight``: a key fetched for a local task and then asked to be computed
    there (``resumed``, the transfer goes on) is freed while that task still reads it:
    the worker stops wanting to compute it but keeps the transfer for the reader.

    Over FIFO streams that never happens: the scheduler sends the reader back to waiting
    (``FreeKeys``) in the same drain as the ``ComputeTask`` that resumed the key, right
    behind it, and frees the key itself only later on that stream. Only a scheduler crash
    between the two messages gets there: the ``FreeKeys`` of the reader is lost, and the
    worker's ``SchedulerLost`` frees the key and its reader in one pass, the reader still
    attached. The cluster machine's ``lose_source``/``lose_peer_in_flight`` do this with
    ``then="crash"`` (``_crash_behind``)."""
    sim = ClusterSimulator(validate=True)
    record_scheduler(sim)
    a = sim.add_worker(name="A")
    b = sim.add_worker(name="B")
    tasks = [SimTask("x", workers=["A", "B"]), SimTask("y", ["x"], workers=["B"])]
    sim.submit("c", tasks, ["y"])
    sim.deliver("scheduler", a)  # ComputeTask(x)
    sim.finish(a, "x")
    sim.deliver(a, "scheduler")  # TaskFinished(x): ComputeTask(y) for B
    sim.deliver("scheduler", b)  # B fetches x from A for y
    sim.lose_worker(a)  # x lost: computed again on B, y back to waiting
    queued = list(sim.queues[("scheduler", b)])
    assert [type(m) for m in queued] == [ComputeTask, FreeKeys]
    assert (queued[0].key, queued[1].keys) == ("x", ["y"])
    sim.deliver("scheduler", b)  # ComputeTask(x) only: x is resumed, y still reads it
    restart_scheduler(sim, 1.0)  # the FreeKeys(y) behind it is lost with the scheduler
    assert moves(sim, b, "x")[-4:] == [
        ("fetch", "flight"),
        ("flight", "resumed"),
        ("resumed", "flight"),  # SchedulerLost: compute it no more, y still reads it
        ("flight", "cancelled"),  # then y is released too: nobody reads it
    ]
    problems = sim.settle(max_rounds=1_000)
    assert not problems, "\n".join(problems)
    assert sim.scheduler.tasks["y"].state == "memory"
