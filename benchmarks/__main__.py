"""``python -m benchmarks [name-or-glob ...] [--repeat N] [--quick] [--list]``."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from pathlib import Path

from benchmarks import _harness


def _import_workload_modules() -> None:
    """Every ``benchmarks/<topic>.py`` registers its workloads when imported."""
    package = Path(__file__).parent
    for info in pkgutil.iter_modules([str(package)]):
        if not info.name.startswith("_"):
            importlib.import_module(f"benchmarks.{info.name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help="workloads to run (names, globs or prefixes); all if none")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions per side (at least 3)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not a measurement")
    parser.add_argument("--list", action="store_true", help="list the workloads and exit")
    parser.add_argument("--out", type=Path, default=_harness.RESULTS_DIR, help="where results go")
    args = parser.parse_args(argv)

    _import_workload_modules()
    if args.list:
        for w in _harness.REGISTRY.values():
            print(f"{w.name:28} {w.description}")
        return 0
    results = []
    for workload in _harness.select(args.names):
        print(f"{workload.name}: {workload.description}", flush=True)
        results.append(_harness.run_workload(workload, args.repeat, args.quick))
    print()
    print(_harness.table(results))
    json_path, md_path = _harness.write_results(results, args.out)
    print(f"\nwritten: {json_path} {md_path}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
