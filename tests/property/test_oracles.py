"""The simulator's run oracle (``core/sim_oracle.py``) on hand-made paths: what it accepts.

What it catches is shown by the mutants (``tests/property/mutants.py``,
docs/cluster-machine.md): a broken core under the cluster machine fails on it.
"""

from __future__ import annotations

from trioscheduler.core.simulator import ClusterSimulator, SimTask


def settled(sim: ClusterSimulator) -> None:
    problems = sim.settle(max_rounds=1_000)
    assert not problems, "\n".join(problems)


def test_a_retried_key_erred_by_its_input_runs_again() -> None:
    """``client.retry(y)`` of a key that erred because its input ``x`` failed runs ``x``
    again, then ``y``: the user gets ``y``'s value, not the old error (the retries oracle
    checks that ``y`` left ``erred`` as the scheduler handled the retry)."""
    sim = ClusterSimulator(validate=True)
    sim.add_worker()
    sim.submit("c", [SimTask("x", fail_attempts=1), SimTask("y", ["x"])], ["y"])
    sim.run_to_completion()
    assert sim.scheduler.tasks["y"].state == "erred"
    sim.retry("c", ["y"])  # the oracle: y leaves erred now
    assert sim.scheduler.tasks["y"].state == "waiting"
    settled(sim)
    assert sim.scheduler.tasks["y"].state == "memory"


def test_a_retry_that_errs_again_at_once_is_a_retry() -> None:
    """A key whose scattered input was lost erred ("scatter it again"); a retry cannot
    compute that input, so the key errs again while the retry is handled. It moved out
    of ``erred`` and back: the oracle accepts it, and the client is told the error."""
    sim = ClusterSimulator(validate=True)
    a = sim.add_worker()
    sim.add_worker()
    sim.scatter("c", "s", [a])
    sim.submit("c", [SimTask("y", ["s"], workers=[a])], ["y"])
    sim.release("c", ["s"])
    sim.lose_worker(a)  # s is lost; y cannot run without it
    sim.run_to_completion()
    assert sim.scheduler.tasks["y"].state == "erred"
    sim.retry("c", ["y"])
    assert sim.scheduler.tasks["y"].state == "erred"
    settled(sim)


def test_a_peer_named_again_after_a_failed_transfer_may_be_asked_again() -> None:
    """A transfer of ``x`` from its only holder A breaks (the connection, not the data):
    B, knowing no other holder, asks the scheduler (``MissingData``), which still counts
    A and names it again (``RefreshWhoHas``); B fetches from A again and gets ``x``. The
    peers oracle accepts that second fetch: the scheduler named A since the failure."""
    sim = ClusterSimulator(validate=True)
    a = sim.add_worker(name="A")
    b = sim.add_worker(name="B")
    sim.submit("c", [SimTask("x", workers=["A"]), SimTask("y", ["x"], workers=["B"])], ["y"])
    sim.deliver("scheduler", a)
    sim.finish(a, "x")
    sim.deliver(a, "scheduler")  # TaskFinished(x): ComputeTask(y) for B
    sim.deliver("scheduler", b)  # B fetches x from A
    sim.gather(b, a, fail=True)  # the transfer breaks: x missing on B, MissingData(x)
    sim.deliver(b, "scheduler", n=10)  # the scheduler names A again
    sim.deliver("scheduler", b, n=10)  # B fetches from A once more
    assert sim.pending_gathers() == [(b, a)]
    settled(sim)
    assert sim.scheduler.tasks["y"].state == "memory"


def test_a_transfer_that_arrives_for_nobody_is_dropped_unreported() -> None:
    """B fetches ``x`` for ``y``; the client cancels ``y`` while the transfer is on its
    way, so B no longer wants ``x``: the value that arrives is dropped, and B reports
    nothing. The transfers-reported oracle checks only values a worker keeps; one that
    B kept would be in the same batch's ``AddKeys``."""
    sim = ClusterSimulator(validate=True)
    a = sim.add_worker(name="A")
    b = sim.add_worker(name="B")
    sim.submit("c", [SimTask("x", workers=["A"])], ["x"])
    sim.run_to_completion()
    sim.submit("c", [SimTask("y", ["x"], workers=["B"])], ["y"])
    sim.deliver("scheduler", b)  # B fetches x from A
    sim.cancel("c", ["y"])
    sim.deliver("scheduler", b)  # FreeKeys(y): x is cancelled in flight
    sim.gather(b, a)  # x arrives and is dropped; the oracle accepts it
    assert "x" not in sim.workers[b].data
    settled(sim)


def test_a_transfer_of_a_key_the_worker_was_asked_to_compute_is_reported_as_finished() -> None:
    """B fetches ``x`` from A for ``y``; the client cancels ``x`` and submits ``x`` and
    ``y`` again, now both on B: B, still fetching, is asked to compute ``x``
    (``flight -> resumed``). The transfer then brings the value, which B reports as the
    run's result (``TaskFinished``), not as a replica. The transfers-reported oracle
    accepts either report (it fired on this path in the compiled core's ci run)."""
    sim = ClusterSimulator(validate=True)
    a = sim.add_worker(name="A")
    b = sim.add_worker(name="B")
    sim.submit("c", [SimTask("x", workers=["A"])], ["x"])
    sim.run_to_completion()
    sim.submit("c", [SimTask("y", ["x"], workers=["B"])], ["y"])
    sim.deliver("scheduler", b)  # B fetches x from A
    sim.cancel("c", ["x"])  # x and y go; A's FreeKeys(x) stays undelivered
    sim.submit("c", [SimTask("x", workers=["B"]), SimTask("y", ["x"], workers=["B"])], ["y"])
    sim.deliver("scheduler", b, n=10)  # FreeKeys(y), then ComputeTask(x): resumed
    assert sim.workers[b].state.tasks["x"].state == "resumed"
    sim.gather(b, a)  # the value arrives: TaskFinished(x)
    assert sim.workers[b].state.tasks["x"].state == "memory"
    settled(sim)
    assert sim.scheduler.tasks["y"].state == "memory"


def test_lost_scattered_data_blamed_through_a_value_computed_from_it() -> None:
    """The outcome check's excuse for lost scattered data (found as a false positive of
    its session-9 form by the ci machine): ``s``, scattered, is released once ``y`` is
    computed from it; ``y``'s worker dies, ``y`` is needed again and cannot be
    recomputed. No worker that left held ``s``, but one held ``y``: accepted."""
    sim = ClusterSimulator(validate=True)
    a = sim.add_worker(name="A")
    b = sim.add_worker(name="B")
    sim.scatter("c", "s", [a])
    sim.submit("c", [SimTask("y", ["s"], workers=["B"])], ["y"])
    sim.run_to_completion()
    sim.release("c", ["s"])
    sim.run_to_completion()
    assert "s" not in sim.workers[b].data and "y" in sim.workers[b].data
    sim.lose_worker(b)
    settled(sim)
    assert sim.scheduler.tasks["y"].state == "erred"


def test_lost_scattered_data_scattered_again_after_its_loss() -> None:
    """(Found as a false positive with the ci machine too.) ``s`` is lost with its only
    holder and ``y`` errs with it; the client scatters ``s`` again. ``y`` stays erred,
    blaming ``s``: the worker that left held ``s`` after its first scatter, which is
    what the check asks (after its latest one, it would call ``y``'s error unjustified)."""
    sim = ClusterSimulator(validate=True)
    a = sim.add_worker(name="A")
    b = sim.add_worker(name="B")
    sim.scatter("c", "s", [a])
    sim.submit("c", [SimTask("y", ["s"], workers=["B"])], ["y"])
    sim.lose_worker(a)
    sim.run_to_completion()
    assert sim.scheduler.tasks["y"].state == "erred"
    assert sim.scatter("c", "s", [b]) == [b]
    settled(sim)
    assert sim.scheduler.tasks["y"].state == "erred"
