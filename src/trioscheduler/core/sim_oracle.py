"""The simulator's execution oracle: no task runs twice without a reason.

The end-state check of ``ClusterSimulator.check_outcome`` cannot see a task that ran on
two workers at once when both runs produce the same value, nor a task that kills
worker after worker without ever being given up. This oracle watches the runs
themselves, independently of the scheduler's own bookkeeping for them:

* **Ownership** (after every step): a task executing on a worker, and not cancelled
  there, is the scheduler's run of it (``processing_on`` that worker), or the
  scheduler has already disowned it (the last message about the key on its way to that
  worker is a ``FreeKeys``). A run the scheduler forgot without telling the worker is a
  second, concurrent run waiting to happen.
* **Justified re-runs** (at each ``Execute``): a key runs again only if, since its last
  run was assigned, a run of it ended without its result being kept (it failed, was
  rescheduled, was cancelled, its worker died) or the scheduler moved it out of
  ``processing`` or ``memory`` by something other than a steal (a loss, a release or
  cancellation, a retry). A confirmed steal of a task the victim had already started
  is not a reason.
* **Suspicion** (after every step): a task that was processing on ``allowed_failures``
  workers when they died unexpectedly is not processing again (it must err with
  ``KilledWorker``); once it erred, a retry or a scatter may bring it back.
* **Peers** (at each ``GatherDep``): a worker does not fetch a key again from a peer
  whose transfer of it failed (or which said it lacks it), unless the scheduler has
  named that peer as a holder of the key to it since: a transfer retried from the same
  peer without news may go on for ever.
* **Transfers reported** (after each batch a worker handles): every value a transfer
  brought that the worker keeps is in that batch's ``AddKeys`` (or its ``TaskFinished``,
  when the worker was asked to compute the key meanwhile). The scheduler counts a
  replica only when told: ``client.who_has``, the AMM, rebalancing and retirement (which
  waits for its replicas to be counted, for ever) all rely on it, while the worker's
  dependents would run alike without it.
* **Retries** (at each ``client.retry``): every erred key the client retries leaves
  ``erred`` while the scheduler handles the retry (it runs again, from its erred inputs
  up; it may err again at once, as lost scattered data does, but it moves). A key left
  erred is a future ``client.retry`` did nothing for: the user still sees the old error,
  though its failed input ran again and may now be in memory.

Pure, like the simulator: it only reads the cores' states, stories and queues.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from trioscheduler.core.messages import (
    AcquireReplicas,
    AddKeys,
    AddWorker,
    CloseWorker,
    ComputeTask,
    FreeKeys,
    GatherDepFailure,
    GatherDepSuccess,
    Key,
    RefreshWhoHas,
    RemoveWorker,
    Reschedule,
    TaskErred,
    TaskFinished,
    Tick,
    ToScheduler,
)
from trioscheduler.core.worker_transitions import RUNNING_STATES

if TYPE_CHECKING:
    from trioscheduler.core.scheduler import SchedulerState
    from trioscheduler.core.simulator import ClusterSimulator

# Scheduler moves that justify running a key again: out of processing or memory, but
# not processing -> processing (a steal) and not processing -> memory (it just finished).
_SETTLED = frozenset({"processing", "memory"})
_FETCHING = frozenset({"flight", "resumed"})  # a worker's states of a key in a transfer


class OracleError(AssertionError):
    """A task ran (or is running) in a way no event justifies."""


def removes_workers(ev: Any) -> bool:
    """Events after which the scheduler may have removed a worker."""
    t = type(ev)
    return t is RemoveWorker or t is Tick or t is AddWorker


class RunOracle:
    """Counts runs per key and checks the three rules of the module doc."""

    def __init__(self, allowed_failures: int) -> None:
        self.allowed_failures = allowed_failures
        self.runs: dict[Key, int] = {}  # Execute instructions obeyed, per key
        self._marks: dict[Key, int] = {}  # story index of the assignment of its last run
        self._unkept: set[Key] = set()  # a run ended without a kept result since then
        # (worker, key) -> stimulus id of the last ComputeTask for it that worker received
        self.computes: dict[tuple[str, Key], str] = {}
        # key -> (the scheduler's record then, deaths of workers it was processing on)
        self.deaths: dict[Key, tuple[Any, int]] = {}
        # (worker, key) -> peers whose transfer of it failed, not named by the scheduler since
        self.refused: dict[tuple[str, Key], set[str]] = {}

    # ------------------------------------------------------------------ runs

    def started(self, sim: ClusterSimulator, worker: str, key: Key) -> None:
        """``worker`` obeys ``Execute(key)``: is this run justified?"""
        log = sim.scheduler.log
        n = len(log)
        mark = self._marks.get(key)
        self.runs[key] = self.runs.get(key, 0) + 1
        full = log.keys.maxlen is not None and n >= log.keys.maxlen
        this = self._assigned(sim.scheduler, key, n, self.computes.get((worker, key)))
        # A run that obeys an older assignment than the last run's (its ComputeTask was
        # still on the way when the scheduler gave the key up and assigned it again) is
        # justified by a move out of processing since *its* assignment.
        since = mark if mark is None or this >= mark else this
        if (
            since is not None
            and not full
            and key not in self._unkept
            and not self._justified(sim.scheduler, key, since)
        ):
            raise OracleError(
                f"{key!r} runs again on {worker} (run {self.runs[key]}) though no run of it "
                "failed, was cancelled or lost, and the scheduler never moved it out of "
                f"processing/memory since its last run started: {sim.scheduler.story(key)[-6:]}"
            )
        self._marks[key] = this if mark is None else max(mark, this)
        self._unkept.discard(key)

    def ended(self, key: Key, kept: bool) -> None:
        """A run of ``key`` ended; ``kept``: its worker now holds the result."""
        if not kept:
            self._unkept.add(key)

    @staticmethod
    def _assigned(s: SchedulerState, key: Key, n: int, stimulus: str | None) -> int:
        """Where this run's story starts: the scheduler's move of ``key`` into
        ``processing`` that sent the ``ComputeTask`` this run obeys (the run may start
        after the scheduler released and even re-assigned the key: that ``FreeKeys``
        and the next ``ComputeTask`` are still behind it on the stream)."""
        log = s.log
        keys, finishes, stimuli = log.keys, log.finishes, log.stimuli
        for i in range(n - 1, -1, -1):
            if keys[i] == key and finishes[i] == "processing":
                if stimulus is None or stimuli[i] == stimulus:
                    return i
        return n

    def delivered(self, worker: str, events: Iterable[Any], tasks: dict[Key, Any]) -> None:
        """Messages reach ``worker`` (whose tasks are ``tasks``, before it handles them):
        remember which assignment each ComputeTask is, and which peers failed a transfer
        of a key or were named as its holders again."""
        for ev in events:
            t = type(ev)
            if t is ComputeTask:
                self.computes[(worker, ev.key)] = ev.stimulus_id
                self._named(worker, ev.who_has)
            elif t is AcquireReplicas or t is RefreshWhoHas:
                self._named(worker, ev.who_has)
            elif t is GatherDepFailure or t is GatherDepSuccess:
                failed = ev.keys if t is GatherDepFailure else [*ev.missing, *ev.unusable]
                for key in failed:
                    ts = tasks.get(key)
                    if ts is not None and ts.state in _FETCHING and ts.coming_from == ev.peer:
                        self.refused.setdefault((worker, key), set()).add(ev.peer)

    @staticmethod
    def transfers_reported(
        worker: str, events: Iterable[Any], out: Iterable[Any], tasks: dict[Key, Any]
    ) -> None:
        """``worker`` handled ``events`` (its tasks now ``tasks``) and answered ``out``:
        each value a transfer brought that it keeps is reported: a replica by ``AddKeys``,
        a key it was asked to compute meanwhile (``resumed``) by ``TaskFinished``."""
        arrived = [k for ev in events if type(ev) is GatherDepSuccess for k in ev.data]
        if not arrived:
            return
        added: set[Key] = set()
        for ins in out:
            if type(ins) is ToScheduler:
                t = type(ins.msg)
                if t is AddKeys:
                    added.update(ins.msg.keys)
                elif t is TaskFinished:
                    added.add(ins.msg.key)
        for key in arrived:
            ts = tasks.get(key)
            if ts is not None and ts.state == "memory" and key not in added:
                raise OracleError(
                    f"{worker} keeps {key!r}, which a transfer just brought, and does not "
                    "tell the scheduler (no AddKeys or TaskFinished): a replica nobody counts"
                )

    def _named(self, worker: str, who_has: dict[Key, Any]) -> None:
        refused = self.refused
        if not refused:
            return
        for key, holders in who_has.items():
            peers = refused.get((worker, key))
            if peers:
                peers.difference_update(holders)

    def fetching(self, worker: str, peer: str, keys: Iterable[Key]) -> None:
        """``worker`` starts a transfer of ``keys`` from ``peer`` (``GatherDep``)."""
        refused = self.refused
        if not refused:
            return
        for key in keys:
            peers = refused.get((worker, key))
            if peers and peer in peers:
                raise OracleError(
                    f"{worker} fetches {key!r} from {peer} again, though that peer's "
                    "transfer of it failed and the scheduler has not named it as a holder "
                    "since: a transfer retried from the same peer for ever"
                )

    @staticmethod
    def _justified(s: SchedulerState, key: Key, mark: int) -> bool:
        log = s.log
        keys, starts, finishes = log.keys, log.starts, log.finishes
        for i in range(mark, len(keys)):
            if keys[i] == key:
                a, b = starts[i], finishes[i]
                if a in _SETTLED and b not in _SETTLED:
                    return True
        return False

    # ------------------------------------------------------------------ losses

    @staticmethod
    def processing_by_worker(s: SchedulerState) -> dict[str, tuple[Any, list[tuple[Key, Any]]]]:
        """Before an event that may remove workers: who processes what."""
        return {
            addr: (ws, [(k, s.tasks[k]) for k in ws.processing]) for addr, ws in s.workers.items()
        }

    def after_removals(
        self,
        s: SchedulerState,
        before: dict[str, tuple[Any, list[tuple[Key, Any]]]],
        events: Iterable[Any],
        effects: Iterable[Any],
    ) -> None:
        """Count, per task, unexpected deaths of workers it was processing on."""
        unexpected: set[str] = set()
        for ev in events:
            if type(ev) is RemoveWorker and not ev.expected:
                unexpected.add(ev.worker)
        for eff in effects:
            if type(eff) is CloseWorker and eff.reason != "retired":
                unexpected.add(eff.worker)  # a heartbeat timeout
        for addr, (ws, processing) in before.items():
            if addr not in unexpected or s.workers.get(addr) is ws:
                continue
            for key, rec in processing:
                old = self.deaths.get(key)
                n = old[1] if old is not None and old[0] is rec else 0
                self.deaths[key] = (rec, n + 1)

    def retried(self, keys: Iterable[Key]) -> None:
        for key in keys:
            self.deaths.pop(key, None)

    @staticmethod
    def check_retry(s: SchedulerState, stimulus: str, erred: Iterable[Key]) -> None:
        """The scheduler handled ``client.retry`` (``stimulus``) of the keys ``erred``,
        which were erred then: each must have moved out of ``erred`` in that handling."""
        log = s.log
        moved = set()
        entries = zip(reversed(log.keys), reversed(log.starts), reversed(log.stimuli), strict=True)
        for key, start, stim in entries:
            if stim != stimulus:
                break
            if start == "erred":
                moved.add(key)
        stuck = [k for k in erred if k not in moved]
        if stuck:
            key = stuck[0]
            raise OracleError(
                f"client.retry({key!r}): it stays erred though it was retried (its failed "
                f"inputs run again, it does not): {s.story(key)[-6:]}"
            )

    # ------------------------------------------------------------------ invariants

    def check(self, sim: ClusterSimulator) -> None:
        s = sim.scheduler
        for addr, w in sim.workers.items():
            for key, ts in w.state.tasks.items():
                if ts.state not in RUNNING_STATES:
                    continue
                sts = s.tasks.get(key)
                if sts is not None and sts.state == "processing" and sts.processing_on == addr:
                    continue
                if _disowned(sim.queues.get(("scheduler", addr), ()), key):
                    continue
                where = "forgotten" if sts is None else f"{sts.state} on {sts.processing_on}"
                raise OracleError(
                    f"{key!r} is {ts.state} on {addr}, but the scheduler has it {where} and "
                    "never told that worker to drop it: a second run may start elsewhere"
                )
        for addr, ws in s.workers.items():
            sw = sim.workers.get(addr)
            if sw is None:
                continue
            for key in ws.processing:
                wts = sw.state.tasks.get(key)
                if wts is None or wts.state != "memory":
                    continue
                if _reported(sim.queues.get((addr, "scheduler"), ()), key) or _mentioned(
                    sim.queues.get(("scheduler", addr), ()), key
                ):
                    continue
                raise OracleError(
                    f"{key!r} is in memory on {addr}, which the scheduler has processing it, "
                    "and no report of it is on its way: the key would wait forever"
                )
        for key, (rec, n) in list(self.deaths.items()):
            if n >= self.allowed_failures and s.tasks.get(key) is rec and rec is not None:
                if rec.state == "erred":
                    del self.deaths[key]  # given up, as it should: a retry or scatter may revive it
                elif rec.state == "processing":
                    raise OracleError(
                        f"{key!r} was processing on {n} workers that died (allowed_failures="
                        f"{self.allowed_failures}) and is processing again: it should have "
                        "erred with KilledWorker"
                    )


def _reported(queue: Iterable[Any], key: Key) -> bool:
    """Does a worker's stream to the scheduler carry the result of ``key``, or news that
    it gave the run up (a ``Reschedule``: the scheduler places it again)?"""
    for msg in queue:
        t = type(msg)
        if (t is TaskFinished or t is TaskErred or t is Reschedule) and msg.key == key:
            return True
        if t is AddKeys and key in msg.keys:
            return True
    return False


def _mentioned(queue: Iterable[Any], key: Key) -> bool:
    """Is a message about ``key`` still on its way to the worker (it will answer it)?"""
    for msg in queue:
        t = type(msg)
        if (t is ComputeTask and msg.key == key) or (t is FreeKeys and key in msg.keys):
            return True
    return False


def _disowned(queue: Iterable[Any], key: Key) -> bool:
    """Is the last message about ``key`` in this queue a ``FreeKeys``?"""
    last = None
    for msg in queue:
        t = type(msg)
        if t is FreeKeys:
            if key in msg.keys:
                last = t
        elif t is ComputeTask and msg.key == key:
            last = t
    return last is FreeKeys
