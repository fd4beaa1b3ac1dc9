"""What the cluster machine's rule families share: its knobs, the tally, ``guarded``,
``pick`` and the strategies, and ``MachineParts``, the state every family reads.

The machine itself (``ClusterMachine``, its set-up, invariant, teardown and weights) is
in ``test_cluster_machine.py``; its rules, by family, in ``machine_client_rules.py``
(what clients do, scatter races included), ``machine_work_rules.py`` (messages, task
runs and transfers, stragglers, keys computed again while they still move) and
``machine_fault_rules.py`` (workers and the scheduler: joins, deaths, restarts, time,
memory). Rules are found by name on the assembled class, so which file holds a rule does
not move the derandomized ci profile.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import strategies as st
from machine_coverage import Tally

from trioscheduler.core.simulator import ALWAYS, ClusterSimulator

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
    def wrapper(self: MachineParts, *args: Any, **kwargs: Any) -> Any:
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


class MachineParts:
    """The machine's state, as its rule families see it (``ClusterMachine`` sets it)."""

    sim: ClusterSimulator
    n_keys: int
    n_scattered: int
    faults: int  # workers this run may still kill, re-register or retire
    aimed: int  # ... and kill at a chosen moment (holding data others need)
    races: int  # ... and kill mid-transfer or mid-rerun (``resumed``)
    restarts: int  # scheduler crashes this run may still have
    crashes: int  # ... and crashes right behind a ComputeTask (``_crash_behind``)
    client_restarts: int  # Client.restart's cancellation: at most once a run
    drops: int  # holders that may still restart just before a fetch (``drop_before_fetch``)
    awaited: bool  # a worker died with the scheduler: its grace must run out
    ok: bool  # False while a rule runs (see ``guarded``)
