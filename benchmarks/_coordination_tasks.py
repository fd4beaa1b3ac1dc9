"""What the coordination benchmarks run on workers (importable by both systems' workers)."""

from __future__ import annotations

import time
from typing import Any


def api(system: str) -> Any:
    """The package whose primitives a task uses: ours or dask's."""
    if system == "trio":
        import trioscheduler

        return trioscheduler
    import distributed

    return distributed


def semaphore_cycles(i: int, system: str, name: str, max_leases: int, cycles: int) -> list[float]:
    """``cycles`` acquire+release of one shared semaphore; ``[start, end]`` wall times."""
    sem = api(system).Semaphore(max_leases=max_leases, name=name)
    start = time.time()
    for _ in range(cycles):
        sem.acquire()
        sem.release()
    return [start, time.time()]


class Counter:
    """The actor of the method-call round trip."""

    def __init__(self) -> None:
        self.n = 0

    def increment(self) -> int:
        self.n += 1
        return self.n
