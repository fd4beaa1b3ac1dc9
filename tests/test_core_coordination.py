"""``core.coordination`` alone: events in, the exact effects out.

The two regressions at the end were found by the hypothesis machine
(``tests/property/test_coordination_machine.py``) while the core was written.
"""

from __future__ import annotations

from trioscheduler.core import coordination as c
from trioscheduler.core.coordination import (
    Abandon,
    ClientGone,
    CoordinationState,
    Fail,
    MultiAcquire,
    QueueGet,
    QueuePut,
    Reply,
    SemAcquire,
    SemRelease,
    Tick,
    UnwantKeys,
    VarGet,
    VarSet,
    WantKeys,
    WorkerGone,
)


def effects(state: CoordinationState, event: object) -> list[tuple[object, ...]]:
    """The effects as plain tuples, comparable in one assert."""
    out: list[tuple[object, ...]] = []
    for eff in state.handle(event):
        if isinstance(eff, Reply):
            out.append(("reply", eff.request, eff.value))
        elif isinstance(eff, Fail):
            out.append(("fail", eff.request, eff.kind))
        elif isinstance(eff, WantKeys):
            out.append(("want", *eff.keys))
        else:
            assert isinstance(eff, UnwantKeys)
            out.append(("unwant", *eff.keys))
    return out


def acquire(
    now: float, r: int, owner: str, worker: str | None, lease: str, timeout: float | None = None
) -> SemAcquire:
    return SemAcquire(now, r, owner, worker, "lock", 1, lease, timeout)


def test_lock_is_handed_on_in_order_and_never_twice() -> None:
    s = CoordinationState(validate=True)
    assert effects(s, acquire(0, 1, "a", None, "la")) == [("reply", 1, True)]
    assert effects(s, acquire(0, 2, "b", None, "lb")) == []  # waits
    assert effects(s, acquire(0, 3, "c", None, "lc")) == []
    assert effects(s, acquire(0, 4, "a", None, "la")) == [("reply", 4, True)]  # a retry
    assert effects(s, SemRelease(1, 5, "lock", "la")) == [("reply", 5, True), ("reply", 2, True)]
    assert effects(s, SemRelease(1, 6, "lock", "la")) == [("reply", 6, False)]  # not held
    assert list(s.semaphores["lock"].leases) == ["lb"]


def test_a_dead_workers_lease_goes_to_the_next_waiter() -> None:
    s = CoordinationState(validate=True)
    effects(s, acquire(0, 1, "worker-client", "tcp://w1", "l1"))
    effects(s, acquire(0, 2, "user", None, "l2"))
    assert effects(s, WorkerGone(5, "tcp://w2")) == []  # another worker: nothing
    assert effects(s, WorkerGone(5, "tcp://w1")) == [("reply", 2, True)]
    assert effects(s, ClientGone(6, "user")) == []
    assert "lock" not in s.semaphores  # nothing held, nobody waits: forgotten


def test_waiters_time_out_at_the_tick_past_their_deadline() -> None:
    s = CoordinationState(validate=True)
    effects(s, acquire(0, 1, "a", None, "la"))
    effects(s, acquire(0, 2, "b", None, "lb", timeout=1.0))
    effects(s, VarGet(0, 3, "b", None, "v", 2.0))
    assert s.next_deadline() == 1.0
    assert effects(s, Tick(0.5)) == []
    assert effects(s, Tick(1.0)) == [("reply", 2, False)]
    assert effects(s, Tick(2.5)) == [("fail", 3, "TimeoutError")]
    assert s.next_deadline() is None


def test_an_abandoned_waiter_is_never_served() -> None:
    s = CoordinationState(validate=True)
    effects(s, acquire(0, 1, "a", None, "la"))
    effects(s, acquire(0, 2, "b", None, "lb"))
    effects(s, acquire(0, 3, "c", None, "lc"))
    assert effects(s, Abandon(1, 2)) == []
    assert effects(s, SemRelease(1, 4, "lock", "la")) == [("reply", 4, True), ("reply", 3, True)]


def test_futures_in_values_stay_wanted_until_the_getter_confirms() -> None:
    s = CoordinationState(validate=True)
    assert effects(s, VarSet(0, 1, "v", b"blob", ["k"])) == [("want", "k"), ("reply", 1, None)]
    assert effects(s, VarGet(0, 2, "reader", None, "v", None)) == [
        ("reply", 2, [b"blob", ["k"], 2])
    ]
    assert effects(s, VarSet(0, 3, "v", b"other", [])) == [("reply", 3, None)]  # receipt holds k
    assert effects(s, c.Confirm(0, 4, 2)) == [("unwant", "k"), ("reply", 4, True)]
    # a reader that dies before confirming does not keep the key for ever
    effects(s, QueuePut(0, 5, "w", None, "q", 0, b"item", ["j"], None))
    assert effects(s, QueueGet(0, 6, "reader", None, "q", 0, False, None)) == [
        ("reply", 6, [b"item", ["j"], 6])
    ]
    assert effects(s, ClientGone(1, "reader")) == [("unwant", "j")]


def test_multilock_takes_free_locks_and_waits_for_the_rest() -> None:
    s = CoordinationState(validate=True)
    assert effects(s, MultiAcquire(0, 1, "a", None, "m1", ["x", "y"], 2, None)) == [
        ("reply", 1, True)
    ]
    assert effects(s, MultiAcquire(0, 2, "b", None, "m2", ["y", "z"], 2, None)) == []
    assert effects(s, MultiAcquire(0, 3, "c", None, "m3", ["y", "z"], 1, None)) == []
    assert effects(s, ClientGone(1, "a")) == [("reply", 2, True)]
    assert s.locks == {"y": ["m2", "m3"], "z": ["m2", "m3"]}


# -- regressions found by the hypothesis machine ------------------------------------------


def test_regression_batch_true_is_one_list_not_a_list_in_a_list() -> None:
    """``QueueGet(batch=True)`` replied ``[[blobs, keys, receipt]]``: wrapped once too often."""
    s = CoordinationState(validate=True)
    effects(s, QueuePut(0, 1, "w", None, "q", 0, b"one", [], None))
    assert effects(s, QueueGet(0, 2, "r", None, "q", 0, True, None)) == [
        ("reply", 2, [[b"one"], [], None])
    ]


def test_regression_a_holder_leaving_while_its_waiter_is_served_by_another_leaving() -> None:
    """``_drop_holder`` walked a snapshot of the holder's waiters; cancelling one (a getter
    of two items at the head of a queue) served the next (a getter of one, same holder),
    and the walk then cancelled that one again: ``KeyError``. A waiter served meanwhile is
    now skipped."""
    s = CoordinationState(validate=True)
    s.handle(QueuePut(0, 1, "w", None, "q", 0, b"one", [], None))
    assert effects(s, QueueGet(0, 2, "dead", None, "q", 0, 2, None)) == []
    assert effects(s, QueueGet(0, 3, "dead", None, "q", 0, False, None)) == []
    out = effects(s, ClientGone(1, "dead"))
    assert out == [("reply", 3, [b"one", [], None]), ("fail", 2, "RuntimeError")]
    assert not s.waiters
