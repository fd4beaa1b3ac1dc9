"""Task functions of the cluster benchmarks, importable by the workers of both systems.

They live in a module (not in ``__main__``) so that both trioscheduler and
dask.distributed pickle them by reference, the way a user's library function travels.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def inc(x: int) -> int:
    return x + 1


def add(x: int, y: int) -> int:
    return x + y


def make_array(nbytes: int, seed: int = 0, first: float = 0.0) -> np.ndarray:
    """``nbytes`` of random float64 (incompressible, every page touched), ``[0] = first``."""
    arr = np.random.default_rng(seed).random(nbytes // 8)
    arr[0] = first
    return arr


def first(arr: np.ndarray) -> float:
    return float(arr[0])


def nbytes_of(arr: Any) -> int:
    return int(arr.nbytes)


def touch(arr: np.ndarray) -> float:
    """Read one value per 4 KiB page of a float64 array (every page of it, little else)."""
    return float(arr.reshape(-1)[::512].sum())


def total(*xs: float) -> float:
    return float(sum(xs))


def peak_rss() -> int:
    """This process's peak resident set (bytes): ``VmHWM``, else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
