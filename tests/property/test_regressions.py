"""Failures the cluster state machine found, each shrunk to a named, deterministic test.

Every test drives the pure ``ClusterSimulator`` through the few steps hypothesis shrank
the failure to, then settles the cluster and asserts nothing is wrong. A bug not fixed
yet in its core is marked ``xfail(strict=True)`` with the cause: once the core is fixed
the test passes, the strict mark turns that into a failure, and the mark comes off.
"""

from __future__ import annotations

from trioscheduler.core.simulator import ClusterSimulator, SimTask


def settled(sim: ClusterSimulator) -> None:
    problems = sim.settle(max_rounds=1_000)
    assert not problems, "\n".join(problems)


def holder(sim: ClusterSimulator, key: str) -> str:
    (addr,) = sim.scheduler.tasks[key].who_has
    return addr


def test_retire_stalls_when_its_unique_key_is_released() -> None:
    """Fixed: ``_retire_progress`` ran only on replica/finish reports and worker removal;
    a retiring worker whose last unique key was released (not replicated) stayed
    ``closing`` forever. Now retirements are re-checked after every event."""
    sim = ClusterSimulator(validate=True)
    sim.add_worker()
    sim.add_worker()
    sim.submit("c", [SimTask("x")], ["x"])
    sim.run_to_completion()
    sim.retire_worker(holder(sim, "x"))  # AcquireReplicas(x) queued for the other worker
    sim.release("c", ["x"])  # x forgotten before the replica is made
    sim.run_to_completion()
    assert not sim.scheduler.retiring, "the retiring worker never closes"


def test_missing_data_for_forgotten_key_leaves_worker_missing() -> None:
    """Fixed: ``replicas.on_missing_data`` ignored a forgotten key (and one without holders), so
    the asking worker kept it in ``missing`` forever; now it is told to free it."""
    sim = ClusterSimulator(validate=True)
    a = sim.add_worker()
    b = sim.add_worker()
    sim.submit("c", [SimTask("x")], ["x"])
    sim.run_to_completion()
    src = holder(sim, "x")
    dst = b if src == a else a
    sim.retire_worker(src)  # asks dst to fetch x from src
    sim.cancel("c", ["x"])  # x forgotten; src frees it
    sim.deliver("scheduler", src)  # FreeKeys(x): src drops the value
    sim.deliver("scheduler", dst)  # AcquireReplicas(x from src)
    sim.gather(dst, src)  # src no longer has it: dst -> missing, MissingData(x)
    sim.deliver(dst, "scheduler")
    sim.run_to_completion()
    assert sim.workers[dst].state.tasks.get("x") is None, "dst still looks for a forgotten key"


def test_cancelled_retirement_recheck_overrides_waiting_recommendation() -> None:
    """Fixed: a worker is lost while another retires: the lost key's no-worker dependent is
    recommended back to ``waiting``, then the retirement is called off (no other running
    worker) and ``_recheck_unrunnable`` overwrites that recommendation with
    ``processing``; ``no-worker -> processing`` finds no worker and leaves the task in
    ``no-worker`` although its dependency is no longer in memory."""
    sim = ClusterSimulator(validate=True)
    a = sim.add_worker(name="A")
    b = sim.add_worker(name="B")
    tasks = [
        SimTask("x", workers=["A"]),
        SimTask("z", workers=["B"]),
        SimTask("y", ["x"], workers=["nobody"]),
    ]
    sim.submit("c", tasks, ["y", "z"])
    sim.run_to_completion()
    assert sim.scheduler.tasks["y"].state == "no-worker"
    sim.retire_worker(b)  # z is unique on B: retirement waits for a replica on A
    sim.lose_worker(a)  # x lost -> y should wait; retirement of B called off
    sim.check()


def test_missing_data_after_the_key_was_reassigned_to_the_asking_worker() -> None:
    """The asking worker's ``MissingData`` arrives after the scheduler gave it the key to
    compute (the only holder died): freeing the key there would drop that ComputeTask
    and leave the task ``processing`` forever. (A first fix of
    ``test_missing_data_for_forgotten_key_leaves_worker_missing`` did exactly that.)"""
    sim = ClusterSimulator(validate=True)
    a = sim.add_worker(name="A")
    b = sim.add_worker(name="B")
    tasks = [
        SimTask("x", workers=["A"], allow_other_workers=True),
        SimTask("y", ["x"], workers=["B"]),
    ]
    sim.submit("c", tasks, ["y"])
    sim.deliver("scheduler", a)  # ComputeTask(x)
    sim.finish(a, "x")
    sim.deliver(a, "scheduler")  # TaskFinished(x): ComputeTask(y) for B, x held by A
    sim.deliver("scheduler", b)  # B fetches x from A
    sim.lose_worker(a)  # x lost: recomputed on B, the only worker left
    sim.gather(b, a)  # the fetch fails: x is missing on B -> MissingData(x)
    sim.deliver("scheduler", b, n=100)  # ComputeTask(x) overtakes the MissingData
    sim.deliver(b, "scheduler", n=100)
    settled(sim)


def test_task_finished_crossing_its_free_keys_is_not_a_replica() -> None:
    """Fixed: a TaskFinished that crossed the scheduler's FreeKeys for the same key was
    counted as a replica while the worker dropped the value; the cluster machine found a
    run where fetchers then waited on that phantom holder forever. The worker now reports
    ReleaseWorkerData when it drops a value (as dask's does)."""
    sim = ClusterSimulator(validate=True)
    a = sim.add_worker(name="A")
    b = sim.add_worker(name="B")
    c = sim.add_worker(name="C")
    tasks = [SimTask("x", workers=["A", "C"]), SimTask("y", ["x"], workers=["B"])]
    sim.submit("c", tasks, ["x", "y"])
    sim.deliver("scheduler", a)  # ComputeTask(x)
    sim.finish(a, "x")
    sim.deliver(a, "scheduler")  # TaskFinished(x): ComputeTask(y) for B
    sim.deliver("scheduler", b)  # B fetches x from A
    sim.gather(b, a)  # B holds a replica; its AddKeys(x) waits in B's queue
    sim.lose_worker(a)  # no other holder known: x is recomputed on C
    sim.deliver("scheduler", c, n=100)  # ComputeTask(x)
    sim.finish(c, "x")  # C's TaskFinished(x) waits in C's queue
    sim.deliver(b, "scheduler", n=100)  # AddKeys(x) from B: memory at B, FreeKeys(x) to C
    sim.deliver(c, "scheduler", n=100)  # TaskFinished(x) from C, already being freed
    sim.deliver("scheduler", c, n=100)  # FreeKeys(x): C drops the value
    sim.run_to_completion()
    phantoms = [w for w in sim.scheduler.tasks["x"].who_has if "x" not in sim.workers[w].data]
    assert not phantoms, f"the scheduler counts {phantoms} as holding x"


def test_scatter_over_an_erred_key() -> None:
    """Fixed: scattering a value under the key of an erred task (here erred with
    KilledWorker) moved it ``erred -> released``, whose ``waiting`` recommendation (a
    client wants it) then ran on the task the scatter had put in memory:
    ``InvalidTransition memory -> waiting``. Found by the cluster machine's scatter rule."""
    sim = ClusterSimulator(validate=True, allowed_failures=1)
    a = sim.add_worker(nthreads=2)
    b = sim.add_worker(nthreads=2)
    sim.submit("c", [SimTask("x"), SimTask("y")], ["x", "y"])
    sim.lose_worker(holder_of_processing(sim, "x"))
    assert sim.scheduler.tasks["x"].state == "erred"  # KilledWorker at the first loss
    alive = a if a in sim.workers else b
    sim.scatter("c", "x", [alive])
    assert sim.scheduler.tasks["x"].state == "memory"
    settled(sim)


def holder_of_processing(sim: ClusterSimulator, key: str) -> str:
    on = sim.scheduler.tasks[key].processing_on
    assert on is not None
    return on


def test_stale_task_finished_of_a_forgotten_key() -> None:
    """Fixed: found by the cluster machine's resubmit rule and its run oracle. A task
    finishes on A, but before A's TaskFinished arrives the client drops it (the
    scheduler forgets it and frees it on A); the client submits the same key again and
    it is assigned to A once more. The stale TaskFinished then arrives and the scheduler
    takes it as the new run's result (``memory`` on A), while A drops the old value
    (FreeKeys) and runs the task again, a run the scheduler no longer owns: a second
    concurrent run becomes possible, and the data is briefly counted where it is not.
    Fixed as dask does, with a ``run_id``: ComputeTask carries one, TaskFinished and
    TaskErred echo it, the scheduler ignores an answer to an older assignment."""
    sim = ClusterSimulator(validate=True)
    a = sim.add_worker()
    x = SimTask("x")
    sim.submit("c", [x], ["x"])
    sim.deliver("scheduler", a)  # ComputeTask(x)
    sim.finish(a, "x")  # TaskFinished(x) waits in A's queue
    sim.remove_client("c")  # x forgotten; FreeKeys(x) for A
    sim.submit("c", [x], ["x"])  # the same key again: ComputeTask(x) for A
    sim.deliver(a, "scheduler")  # the stale TaskFinished: taken for the new run
    sim.deliver("scheduler", a, n=100)  # A drops the old value and runs x again
    sim.check()  # the oracle: A runs x, which the scheduler has in memory
    assert sim.scheduler.tasks["x"].state == "processing"
    settled(sim)


def test_scatter_over_a_rescheduled_task_races_its_stale_free_keys() -> None:
    """Fixed (found 2026-12-06 by the machine with a fire-and-forget rule, which only
    changed the derandomized path; shrunk by hand). A running task is rescheduled on its
    worker A: the scheduler queues FreeKeys(x) (the old run) and ComputeTask(x) (the new
    one) for A. The client scatters x straight to A before those arrive, then tells the
    scheduler, which counted x in memory on A. The stale FreeKeys then dropped the
    scattered value on A and the ComputeTask ran x again: the scheduler counted data A
    did not hold, and a run it did not own was executing.

    dask's worker has the same race: its free-keys names no copy (``FreeKeysEvent`` has
    only keys, ``_handle_free_keys`` releases each), and its scheduler's ``update_data``
    puts the key in memory on the holders whatever it was doing. Fixed in the scheduler:
    told of a scatter to the worker a task is *processing* on (and to no other worker),
    it keeps that run instead of counting the data. The run's ComputeTask is on its way
    to that worker, or answered already: a worker that gave the run up (reschedule,
    steal) tells the scheduler, and one computing the key declines the scatter. So the
    run's TaskFinished always comes: from the scattered value if it survives, or from
    computing x again if a FreeKeys sent before the scheduler knew of the scatter dropped
    it; either way a run the scheduler owns. (A pending steal keeps the old way, the data
    winning at once; a scatter that also reached other workers counts those and frees
    the run.)

    A first fix made FreeKeys name the run it cancels (``run_ids``, as ComputeTask and
    TaskFinished carry ``run_id``) so a worker kept a value scattered after that free was
    sent: it kept this test's value, but the cluster machine then found the same race
    with a FreeKeys of a key (not of a run: the next test), which no run id ties to the
    value it meant. Keeping the run covers both, with no new message field."""
    sim = ClusterSimulator(validate=True)
    a = sim.add_worker()
    sim.submit("c", [SimTask("x")], ["x"])
    sim.deliver("scheduler", a, n=10)  # x runs on A
    sim.reschedule(a, "x")
    sim.deliver(a, "scheduler", n=10)  # FreeKeys(x) + ComputeTask(x) queued for A
    sim.scatter("c", "x", [a])  # the data reaches A first
    sim.deliver("scheduler", a, n=10)
    sim.check()


def test_stale_release_worker_data_undoes_a_scatter() -> None:
    """Fixed (e60a179: a ``ReleaseWorkerData`` that uncounts a copy frees the key there).
    A worker drops a key on the scheduler's ``FreeKeys`` and reports it
    (``ReleaseWorkerData``); before the scheduler reads that report, a client scatters
    the same key to that worker and tells the scheduler (``UpdateData``, another stream).
    The stale report then removed the new replica: the worker held data the scheduler did
    not count (never freed: a leak). Found by the machine's rerun/straggle rules the same
    morning as the AMM's variant (``test_scatter_crossing_the_release_of_a_dropped_copy``).
    Dask has the same race (``release_worker_data`` trusts the worker's report)."""
    sim = ClusterSimulator(validate=True)
    w = sim.add_worker()
    sim.submit("c", [SimTask("x")], ["x"])
    sim.run_to_completion()
    sim.release("c", ["x"])  # forgotten: FreeKeys(x) queued for w
    sim.deliver("scheduler", w)  # w drops x; its ReleaseWorkerData(x) is on its way
    assert sim.scatter("c", "x", [w]) == [w]  # the scheduler counts w's new copy
    sim.deliver(w, "scheduler")  # the stale report arrives after the scatter
    settled(sim)


def test_scatter_crossing_the_release_of_a_dropped_copy() -> None:
    """Fixed: the Active Memory Manager drops a copy on w1 (FreeKeys); w1 drops it and
    says so (ReleaseWorkerData); a client scatters the key to w1 again meanwhile, and the
    scheduler counts w1 (UpdateData) before w1's report of the old drop arrives on the
    other stream. The scheduler then uncounted the new copy while w1 kept it for ever (a
    leak, found by the machine once the AMM ran in the core). Now the scheduler also tells
    w1 to drop whatever copy it holds, so both sides agree."""
    sim = ClusterSimulator(validate=True, amm_interval=0.0)
    w1 = sim.add_worker()
    w2 = sim.add_worker()
    sim.scatter("c", "d", [w1, w2])
    sim.tick()  # the AMM's first tick schedules it
    sim.tick()  # it drops one of the two copies: FreeKeys to that worker
    (kept,) = sim.scheduler.tasks["d"].who_has
    dropped = w1 if kept == w2 else w2
    sim.deliver("scheduler", dropped)  # the worker drops it: ReleaseWorkerData queued
    sim.scatter("c", "d", [dropped])  # scattered there again; the scheduler counts it
    assert sim.scheduler.tasks["d"].who_has == {w1, w2}
    settled(sim)


def test_a_stale_run_of_an_older_assignment_is_not_taken_for_an_unjustified_rerun() -> None:
    """Fixed (in the oracle, not the core): the run oracle judged every run against the
    last run's assignment. A's ComputeTask(x) is still on its way when the client leaves
    (x released, a FreeKeys behind it) and another client submits x again, now placed on
    B. B runs x first; then A obeys its old ComputeTask: a run the scheduler disowned and
    whose cancellation follows, which the ownership rule allows. The oracle took it for
    a third run with no reason (the false positive that kept the session-5 machine work
    from landing); now a run is judged from its own assignment."""
    sim = ClusterSimulator(validate=True)
    a = sim.add_worker(name="A")
    b = sim.add_worker(name="B")
    sim.submit("c", [SimTask("x", workers=["A"])], ["x"])
    sim.remove_client("c")  # x released: FreeKeys(x) queued behind A's ComputeTask(x)
    sim.submit("d", [SimTask("x", workers=["B"])], ["x"])
    sim.deliver("scheduler", b, n=10)  # B runs x
    sim.deliver("scheduler", a, n=1)  # A runs its stale assignment
    sim.check()
    settled(sim)


def test_scatter_over_a_resubmitted_task_races_the_free_keys_of_its_old_value() -> None:
    """Fixed with ``test_scatter_over_a_rescheduled_task_races_its_stale_free_keys`` (the
    ci machine found it after a first fix of that one left it open). x is in memory on A; the client drops it (FreeKeys(x)
    queued for A) and submits it again (ComputeTask(x) queued behind). A client scatters x
    to A, which still holds the old value and takes the new one; the scheduler keeps the
    run on A instead of counting the data (the FreeKeys drops it), and the run's answer
    puts x in memory."""
    sim = ClusterSimulator(validate=True)
    a = sim.add_worker()
    x = SimTask("x")
    sim.submit("c", [x], ["x"])
    sim.run_to_completion()
    sim.remove_client("c")  # x forgotten: FreeKeys(x) for A
    sim.submit("c", [x], ["x"])  # the same key again: ComputeTask(x) for A
    sim.scatter("c", "x", [a])  # A takes it over the old value, then the scheduler hears
    sim.deliver("scheduler", a, n=10)  # the FreeKeys drops it; the ComputeTask runs x
    sim.check()
    settled(sim)
    assert sim.scheduler.tasks["x"].who_has == {a}


def test_scatter_to_a_worker_that_gave_the_run_up_waits_for_its_reschedule() -> None:
    """Not a core bug: an oracle false positive (found 2026-12-06 by the ci machine with
    the pure core). x runs on A, which raises ``Reschedule`` (the message is on its way)
    and then takes a scatter of x; the scheduler keeps the run on A (``on_update_data``).
    The "reports" invariant called that "in memory, processing there, no report coming",
    but the Reschedule is the report: the scheduler frees x on A and places it again, here
    on B (A is busy), and the value A held is dropped, not leaked."""
    sim = ClusterSimulator(validate=True)
    sim.add_worker()
    sim.add_worker()
    sim.submit("c", [SimTask("x")], ["x"])
    on = sim.scheduler.tasks["x"].processing_on
    assert on is not None
    sim.deliver("scheduler", on, n=10)  # x runs on A
    sim.reschedule(on, "x")  # Reschedule(x) queued for the scheduler
    sim.scatter("c", "x", [on])  # A takes the value; the scheduler keeps the run
    sim.check()
    busy = [SimTask(k, workers=[on], duration=10.0) for k in ("z1", "z2")]
    sim.submit("c", busy, ["z1", "z2"])
    sim.deliver(on, "scheduler", n=10)
    settled(sim)
    (elsewhere,) = sim.scheduler.tasks["x"].who_has
    assert elsewhere != on
    assert "x" not in sim.workers[on].state.tasks, "A keeps a copy the scheduler does not count"


def test_a_key_scattered_again_survives_the_free_of_its_released_value() -> None:
    """Fixed (found 2026-12-06 as a flaky real-cluster test: one client scattered 41 and
    left, another scattered 41 under the same hashed key at once and found it "lost, no
    lineage"). The release queued FreeKeys(x) for A; the second scatter reached A first;
    the scheduler counted it; the stale free then dropped it, and x, with no lineage,
    erred. dask has the same race. Now each data update on a worker has a number the
    client passes on (``UpdateData.seqs``) and a ``FreeKeys`` names the latest one the
    scheduler knew of: A keeps a value that came by a newer update than the free knew."""
    sim = ClusterSimulator(validate=True)
    a = sim.add_worker()
    sim.add_client("c")
    sim.scatter("c", "x", [a])
    sim.release("c", ["x"])  # x forgotten: FreeKeys(x) queued for A
    sim.scatter("c", "x", [a])  # the same key again, before A hears of the free
    sim.deliver("scheduler", a, n=10)
    sim.deliver(a, "scheduler", n=10)
    settled(sim)
    assert sim.scheduler.tasks["x"].state == "memory"
    assert sim.scheduler.tasks["x"].who_has == {a}
    sim.release("c", ["x"])  # a free sent after the scheduler knew does drop it
    sim.run_to_completion()
    assert "x" not in sim.workers[a].state.tasks


def test_missing_data_from_a_worker_that_holds_the_key_again_leaves_no_uncounted_copy() -> None:
    """Fixed (session 8, found by reading ``replicas.on_missing_data``): the scheduler uncounted
    the errant worker's copy without a ``FreeKeys`` to it, so a copy that worker had
    taken again meanwhile stayed there, uncounted, for ever (a leak). E's old run of x
    finished across a cancel (E counted by its stale ``TaskFinished``, its value then
    dropped by the ``FreeKeys``); F, sent to E for x, hears "missing"; the scheduler
    uncounts E on E's ``ReleaseWorkerData``; a client scatters x to E again (counted);
    F's ``MissingData`` naming E comes last. Session 8 made the scheduler free x on E
    too, so that both sides agree. Since session 10 the report says when E looked
    (``MissingData.errant_seq``): E's copy came by a later scatter, so the report is
    stale and the copy stays, counted and held (``test_stale_missing_data_...``)."""
    sim = ClusterSimulator(validate=True)
    s = "scheduler"
    h = sim.add_worker(name="H")  # sim://w1: F tries it first
    e = sim.add_worker(name="E")
    f = sim.add_worker(name="F")
    sim.submit("c", [SimTask("x", workers=["E"])], ["x"])
    sim.deliver(s, e)
    sim.finish(e, "x")  # TaskFinished(x) of this run on its way
    sim.cancel("c", ["x"])  # FreeKeys(x) for E, crossing it
    sim.submit("c", [SimTask("x", workers=["H"])], ["x"])
    sim.deliver(s, h)
    sim.finish(h, "x")
    sim.deliver(h, s)
    sim.deliver(e, s)  # the old run's TaskFinished: x counted on E too
    assert sim.scheduler.tasks["x"].who_has == {h, e}
    sim.submit("c", [SimTask("w", ["x"], workers=["F"])], ["w"])
    sim.deliver(s, f)  # F fetches x from H, then from E
    sim.gather(f, h, fail=True)
    sim.deliver(s, e, n=10)  # the FreeKeys: E drops x (ReleaseWorkerData queued)
    sim.gather(f, e)  # E says it lacks x: MissingData(x, errant E) queued
    sim.deliver(e, s)  # the ReleaseWorkerData: E uncounted
    assert sim.scatter("c", "x", [e]) == [e]  # E holds x again, counted
    sim.deliver(f, s)  # the MissingData, now stale
    settled(sim)
    x = sim.scheduler.tasks["x"]
    # both sides agree: the scattered copy is counted on E, and E holds it
    assert e in x.who_has
    assert "x" in sim.workers[e].data


def test_a_worker_restarted_at_its_address_numbers_its_scatters_afresh() -> None:
    """Fixed (session 8, found by reading): a worker's data updates are numbered by its
    process (``WorkerState.scatter_seq``), and a new process at the same address counts
    from 0 again, while the scheduler kept the old process's larger number for a key. A
    free then named that stale number, and a value the new process took by a newer
    scatter, which the free was sent before, was dropped: x, with no lineage, erred
    "lost". Now the numbers belong to the worker's registration, not to its address."""
    sim = ClusterSimulator(validate=True)
    s = "scheduler"
    a = sim.add_worker()
    b = sim.add_worker()
    sim.add_client("c")
    sim.scatter("c", "y", [a])  # A's update 1
    sim.scatter("c", "x", [a, b])  # A's update 2
    sim.reregister(a)  # a new process at A's address; x stays on B
    sim.run_to_completion()
    sim.scatter("c", "x", [a])  # the new A's update 1
    sim.release("c", ["x"])  # x forgotten: FreeKeys(x) queued for A
    sim.scatter("c", "x", [a])  # the new A's update 2, before the free arrives
    sim.deliver(s, a, n=10)
    sim.deliver(a, s, n=10)
    settled(sim)
    x = sim.scheduler.tasks["x"]
    assert x.state == "memory", sim.client_msgs["c"].get("x")
    assert x.who_has == {a}


def test_a_key_scattered_again_survives_the_report_of_its_dropped_copy() -> None:
    """Fixed (session 8; found when the client's renaming of a hashed key scattered again
    right after its release came off: a real-cluster test then lost the value). x, scattered
    to A, is released: A drops it on the ``FreeKeys`` and reports the drop
    (``ReleaseWorkerData``, which waits to go with A's next message). The client scatters
    x to A again and the scheduler counts the new copy; the late report of the old drop
    then uncounted it and freed it there: x, with no lineage, erred "lost". Now the
    report says how many data updates A had taken when it was made (``seq``), and the
    scheduler ignores it for a copy that came by a newer one."""
    sim = ClusterSimulator(validate=True)
    a = sim.add_worker()
    sim.add_client("c")
    sim.scatter("c", "x", [a])
    sim.release("c", ["x"])  # x forgotten: FreeKeys(x) queued for A
    sim.deliver("scheduler", a)  # A drops x: ReleaseWorkerData(x) on its way
    assert sim.scatter("c", "x", [a]) == [a]  # the same key again; counted
    sim.deliver(a, "scheduler")  # the report of the old drop comes last
    settled(sim)
    x = sim.scheduler.tasks["x"]
    assert x.state == "memory", sim.client_msgs["c"].get("x")
    assert x.who_has == {a}


def test_stale_missing_data_loses_a_key_scattered_again() -> None:
    """Found 2026-12-06 by the cluster machine's ``drop_before_fetch`` rule (session
    10): a client scatters x to H; a task on F reads it; the client releases both; H
    drops x before F's fetch reaches it and answers that it lacks x; F, knowing no
    other holder, reports ``MissingData(x, errant H)``; the client scatters x to H
    again, and the scheduler counts the new copy; then F's stale report landed, the
    scheduler uncounted H's copy, freed it, and x, with no lineage, erred as lost though
    no worker was. (dask's ``handle_missing_data`` has the same race.) Fixed as
    ``ReleaseWorkerData.seq`` was: H's answer names its data-update count before it
    looked (``get_data``'s ``seq``), ``MissingData.errant_seq`` carries it, and the
    scheduler keeps a copy that came by a later scatter (``replicas.scattered_since``)."""
    sim = ClusterSimulator(validate=True)
    s = "scheduler"
    h = sim.add_worker(name="H")
    f = sim.add_worker(name="F")
    sim.add_client("c")
    assert sim.scatter("c", "x", [h]) == [h]
    sim.submit("c", [SimTask("y", ["x"], workers=["F"])], ["y"])
    sim.deliver(s, f, n=10)  # F fetches x from H
    sim.release("c", ["x", "y"])  # x forgotten: FreeKeys(x) queued for H (and F)
    sim.deliver(s, h, n=10)  # H drops x
    sim.gather(f, h)  # H lacks x: MissingData(x, errant H) queued
    assert sim.scatter("c", "x", [h]) == [h]  # a new value of x, counted on H
    sim.deliver(f, s, n=10)  # the stale MissingData
    settled(sim)
    assert sim.scheduler.tasks["x"].state == "memory"
