"""Known-bad edits of the core, and whether the cluster machine catches each one.

``nox -s mutants`` (or ``python tests/property/mutants.py [NAME ...]``; ``--check``
only checks that each edit still applies): for each mutant,
copy ``src/`` to a temporary directory, apply the edit (an exact text replacement that
must match once), and run the cluster machine with the ``mutants`` profile (the ci
examples, no shrinking) against the copy (``PYTHONPATH``: the pure-Python copy wins
over any installed, compiled core). A mutant is *caught* when the run fails. The
table of results goes to stdout; ``--markdown`` prints it for ``docs/``.

Each mutant drops or bends one line that a family of table edges (or a decision beside
the table) relies on; the list names what a user would see if it shipped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = "trioscheduler/core/"


@dataclass
class Mutant:
    name: str
    path: str  # under src/trioscheduler/core/
    old: str
    new: str
    harm: str


MUTANTS = [
    Mutant(
        "steal-confirmation",
        "stealing.py",
        "    if ev.state in STEAL_REJECT:\n"
        "        return  # the victim already runs it (or has finished): the steal failed\n"
        "    s.recs.pop(ts.key, None)\n"
        "    if ev.state in STEAL_CONFIRM and thief is not None",
        "    s.recs.pop(ts.key, None)\n    if thief is not None",
        "a steal of a task the victim already runs moves it anyway: two concurrent runs",
    ),
    Mutant(
        "suspicion-count",
        "scheduler.py",
        "                ts.suspicious += 1\n",
        "",
        "a task that kills every worker it lands on never errs (KilledWorker never comes)",
    ),
    Mutant(
        "processing-released-no-free",
        "scheduler_transitions.py",
        "def processing_released(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:\n"
        "    _unassign(s, ts, free=True)",
        "def processing_released(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:\n"
        "    _unassign(s, ts, free=False)",
        "a released task keeps running (and its result stays) on the worker",
    ),
    Mutant(
        "processing-waiting-no-free",
        "scheduler_transitions.py",
        "def processing_waiting(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:\n"
        "    _unassign(s, ts, free=True)",
        "def processing_waiting(s: SchedulerState, ts: TaskRecord, worker: Holder, error: Failure) -> None:\n"
        "    _unassign(s, ts, free=False)",
        "a task sent back to waiting keeps running where it was: a second run elsewhere",
    ),
    Mutant(
        "memory-released-no-free",
        "scheduler_transitions.py",
        "        ws.nbytes -= ts.nbytes\n        s.free_on(addr, key)",
        "        ws.nbytes -= ts.nbytes",
        "released data is never deleted on the workers (a leak)",
    ),
    Mutant(
        "to-memory-no-wakeup",
        "scheduler_transitions.py",
        "            dts.n_waiting -= 1\n            if not dts.n_waiting:",
        "            if not dts.n_waiting:",
        "a task whose inputs are all in memory waits forever",
    ),
    Mutant(
        "erred-no-propagation",
        "scheduler_transitions.py",
        '        if dts.state in ACTIVE or (dts.state == "released" and (dts.wanted_by or dts.n_waiters)):\n'
        '            recs[dk] = "erred"',
        '        if False:\n            recs[dk] = "erred"',
        "dependents of a failed task wait forever instead of erring",
    ),
    Mutant(
        "retry-no-dependents",
        "scheduler_transitions.py",
        '        if tasks[dk].state == "erred":\n            s.recommend(dk, "waiting")',
        '        if False:\n            s.recommend(dk, "waiting")',
        "client.retry of a failed input leaves its erred dependents erred",
    ),
    Mutant(
        "missing-data-keeps-errant",
        "replicas.py",
        "        and errant.address in ts.who_has\n",
        "        and False\n",
        "fetchers are sent again and again to a worker that said it lacks the data",
    ),
    Mutant(
        "lost-worker-keeps-replicas",
        "scheduler.py",
        "        for key in list(ws.has_what):\n            ts = tasks[key]\n"
        "            tr.remove_replica(self, ts, ws)",
        "        for key in list(ws.has_what):\n            ts = tasks[key]\n            continue",
        "data on a dead worker is still counted: dependents fetch from nobody",
    ),
    Mutant(
        "update-data-erred-rec",
        "scheduler_client_events.py",
        '                s.recs.pop(key, None)  # its "waiting": the data is here instead\n',
        "",
        "scattering over an erred key crashes the scheduler (memory -> waiting)",
    ),
    Mutant(
        "worker-free-keeps-running",
        "worker.py",
        '            if st in RUNNING_STATES or st == "flight" or st == "resumed":\n'
        '                recs[ts] = "cancelled"',
        '            if st in RUNNING_STATES or st == "flight" or st == "resumed":\n'
        "                continue",
        "a freed running task stays executing: its result is reported as if still wanted",
    ),
    Mutant(
        "worker-flight-no-addkeys",
        "worker_transitions.py",
        "    recs = _enter_memory(ws, ts, stim, now)\n    _report_added(ws, ts)\n    return recs",
        "    recs = _enter_memory(ws, ts, stim, now)\n    return recs",
        "fetched replicas are never reported: the scheduler does not count them",
    ),
    Mutant(
        "worker-gather-keeps-peer",
        "worker.py",
        "                if peer in ts.who_has:  # (never the shared empty set)\n"
        '                    cast("set[str]", ts.who_has).discard(peer)',
        '                if False:\n                    cast("set[str]", ts.who_has).discard(peer)',
        "a failed transfer is retried from the same peer forever",
    ),
    Mutant(
        "worker-missing-silent",
        "worker_transitions.py",
        "    out.append(\n        ToScheduler(\n            MissingData(stim, now, ws.address, ts.key, "
        'ts.errant_peer or "", ts.errant_seq)\n        )\n    )',
        "    pass",
        "a worker that cannot find a dependency never asks: its task hangs",
    ),
    Mutant(
        "worker-resumed-no-report",
        "worker_transitions.py",
        "        out.append(\n"
        "            ToScheduler(\n"
        '                TaskFinished(stim, now, ws.address, ts.key, ts.nbytes, "", now, now, ts.run_id)\n'
        "            )\n"
        "        )",
        "        pass",
        "a transfer that completes after the worker was asked to compute the key never "
        "reports it: the task hangs in processing",
    ),
    Mutant(
        "worker-steal-releases-running",
        "worker.py",
        "        if state in STEALABLE:\n            ts.wanted = False",
        '        if state in STEALABLE or state == "executing":\n            ts.wanted = False',
        "a victim drops a task it is running when asked to give it up",
    ),
    Mutant(
        "worker-spill-failed-ignored",
        "worker.py",
        "        ts.spillable = False\n        if ts.key in self.spilled:",
        "        ts.spillable = False\n        if False:",
        "a value whose spill file failed is counted as on disk while it is in RAM",
    ),
    # session 8: the fixes of scatter races (each reproduced first by a named test)
    Mutant(
        "missing-data-no-free",
        "replicas.py",
        "        s.free_on(errant.address, ts.key)\n",
        "",
        "a worker that lacked a key when asked but holds it again keeps a copy nobody counts",
    ),
    Mutant(
        "release-data-ignores-seq",
        "replicas.py",
        "        if scattered_since(ts, ws, ev.seq):",
        "        if False:",
        "a key scattered again to a worker whose report of dropping it is still on its way "
        "is freed there: scattered data 'lost'",
    ),
    # session 10
    Mutant(
        "missing-data-ignores-seq",
        "replicas.py",
        "        and not scattered_since(ts, errant, ev.errant_seq)",
        "        and True",
        "a key scattered again to a worker a stale MissingData names is uncounted and freed "
        "there: scattered data 'lost'",
    ),
    Mutant(
        "free-keys-ignores-seq",
        "worker.py",
        "                    and ev.seqs.get(key, 0) < seq",
        "                    and False",
        "a key scattered again right after its release is dropped by the free of the old "
        "value: scattered data 'lost'",
    ),
]


# What a caught mutant fails with: an oracle or invariant of the simulator or the cores
CATCHES = ("OracleError", "SimulationError", "InvalidTransition", "AssertionError")


def stale(mutant: Mutant, root: Path = ROOT / "src") -> str:
    """Why ``mutant``'s edit does not apply to the tree under ``root`` ('' if it does)."""
    path = root / CORE / mutant.path
    if not path.exists():
        return f"no file {mutant.path}"
    n = path.read_text().count(mutant.old)
    return "" if n == 1 else f"the edit matches {n} times in {path.name}"


def run(mutant: Mutant, profile: str, timeout: float) -> tuple[str, float, str]:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        why = stale(mutant, src)
        if why:
            return "stale", 0.0, why
        path = src / CORE / mutant.path
        text = path.read_text()
        path.write_text(text.replace(mutant.old, mutant.new))
        env = {**os.environ, "PYTHONPATH": str(src), "TRIOSCHEDULER_PURE_PYTHON": "1"}
        cmd = [
            sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
            f"--hypothesis-profile={profile}",
            str(ROOT / "tests/property/test_cluster_machine.py::test_cluster_machine"),
        ]  # fmt: skip
        t = time.monotonic()
        try:
            p = subprocess.run(
                cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return "timeout", time.monotonic() - t, ""
        elapsed = time.monotonic() - t
        if p.returncode == 0:
            return "survived", elapsed, ""
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("E ")]
        why = next((ln[2:].strip() for ln in lines if "Error" in ln), lines[0] if lines else "")
        if not any(m in p.stdout for m in CATCHES):
            return "error", elapsed, why[:160]  # the run broke, but not on an oracle
        return "caught", elapsed, why[:160]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--profile", default="mutants")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument(
        "--check", action="store_true", help="only check that each edit applies (no runs)"
    )
    args = ap.parse_args()
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        ap.error(f"no mutant named {', '.join(sorted(unknown))}")
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    if args.check:
        bad = [(m, stale(m)) for m in chosen]
        for m, why in bad:
            print(f"{m.name:<32} {'stale: ' + why if why else 'applies'}")
        return 1 if any(why for _, why in bad) else 0
    rows = []
    for m in chosen:
        verdict, seconds, why = run(m, args.profile, args.timeout)
        rows.append((m, verdict, seconds, why))
        print(f"{m.name:<32} {verdict:<9} {seconds:6.1f}s  {why}", flush=True)
    caught = sum(1 for r in rows if r[1] == "caught")
    print(f"caught {caught} of {len(rows)}")
    if args.markdown:
        print("\n| mutant | file | what a user would see | result | s |\n|---|---|---|---|---|")
        for m, verdict, seconds, _ in rows:
            print(f"| `{m.name}` | `core/{m.path}` | {m.harm} | {verdict} | {seconds:.0f} |")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
