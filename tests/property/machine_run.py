"""The cluster machine outside pytest: N runs with a random seed, the tally as JSON.

    PYTHONPATH=src python tests/property/machine_run.py 3000 out.json

The long profile's machine in pieces (several processes, their tallies summed): the
same rules, steps and oracles as ``test_cluster_machine``, without its coverage floor.
Interrupted (SIGINT), it still writes the tally of the runs done.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_cluster_machine as machine  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis.stateful import run_state_machine_as_test  # noqa: E402
from machine_coverage import as_dict  # noqa: E402


def main() -> None:
    n, out = int(sys.argv[1]), Path(sys.argv[2])
    wall, cpu = time.time(), time.process_time()
    machine.TALLY.reset()
    error = None
    try:
        run_state_machine_as_test(
            machine.ClusterMachine,
            settings=settings(
                max_examples=n, stateful_step_count=machine.STEPS, deadline=None,
                print_blob=True, suppress_health_check=[HealthCheck.too_slow],
            ),
        )  # fmt: skip
    except BaseException as e:
        error = repr(e)[:3000]
        raise
    finally:
        tally = machine.TALLY
        report = as_dict(tally)
        report["worker_edges"] = {f"{a}->{b}": v for (a, b), v in tally.worker.items()}
        report["scheduler_edges"] = {f"{a}->{b}": v for (a, b), v in tally.scheduler.items()}
        report.update(wall=time.time() - wall, cpu=time.process_time() - cpu, error=error)
        out.write_text(json.dumps(report, indent=1, default=str))
        print(tally.report())


if __name__ == "__main__":
    main()
