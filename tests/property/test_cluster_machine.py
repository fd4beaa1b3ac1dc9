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

The rules live in three mixins by family (``machine_client_rules.py``,
``machine_work_rules.py``, ``machine_fault_rules.py``), their shared parts in
``machine_parts.py``; this file assembles the machine, its set-up, invariant, teardown
and weights, and runs it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from machine_client_rules import ClientRules
from machine_coverage import as_dict
from machine_fault_rules import FaultRules
from machine_parts import (
    AIMED_FAULTS,
    AMM_INTERVAL,
    MAX_FAULTS,
    NAMES,
    STEP_KINDS,
    TALLY,
    TIMEOUT,
    guarded,
    index,
)
from machine_work_rules import WorkRules

from trioscheduler.core.sim_restart import record_scheduler
from trioscheduler.core.simulator import ALWAYS, ClusterSimulator, SimTask


class ClusterMachine(ClientRules, WorkRules, FaultRules, RuleBasedStateMachine):
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
        self.drops = 1  # a holder restarting just before a fetch: once a run
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
ClusterMachine.rerun_moving_again = ClusterMachine.rerun_moving
ClusterMachine.lose_source_again = ClusterMachine.lose_source
ERRANT_WEIGHT = 4
for _n in range(1, ERRANT_WEIGHT):
    setattr(ClusterMachine, f"scatter_to_errant_{_n}", ClusterMachine.scatter_to_errant)
DROP_WEIGHT = 4
for _n in range(1, DROP_WEIGHT):
    setattr(ClusterMachine, f"drop_before_fetch_{_n}", ClusterMachine.drop_before_fetch)


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
