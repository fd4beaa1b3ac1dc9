"""The cyclic garbage collector in the processes trioscheduler owns.

A scheduler or worker process holds a record (and a few dicts and tuples) per task, few
of them ever in a reference cycle: reference counting frees nearly all of its garbage.
CPython's default thresholds ``(700, 10, 10)`` still walk every young container each 700
allocations, and walk the whole heap each time it has grown by a quarter: with a million
tasks in memory the scheduler spent 12.4 of its 43.7 CPU-s in the collector (55 full
collections, 28 objects found), each worker ~2.8 s (docs/performance.md, "Issue 20,
session 8"). Here the young generation is collected each 10,000 allocations and a full
collection waits for 50 collections of the middle one (10 million allocations) as well as
the quarter rule, so cycles are still found, later.

Only processes started as a scheduler or worker (``trioscheduler scheduler|worker``, a
nanny's child) are tuned, never a user's: a ``Client`` or an in-process cluster leaves
the interpreter as it was. ``TRIOSCHEDULER_GC_THRESHOLDS`` (one to three integers,
``gc.set_threshold``'s arguments, e.g. ``700,10,10`` for CPython's defaults) overrides.
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Final

__all__ = ["ENV", "THRESHOLDS", "tune_collector"]

logger = logging.getLogger("trioscheduler.server")

THRESHOLDS: Final = (10_000, 20, 50)
"""``gc.set_threshold`` in a scheduler or worker process."""

ENV: Final = "TRIOSCHEDULER_GC_THRESHOLDS"


def tune_collector() -> tuple[int, ...]:
    """Set this process's collector thresholds (``THRESHOLDS``, or ``$ENV``); return them."""
    values: tuple[int, ...] = THRESHOLDS
    text = os.environ.get(ENV, "").strip()
    if text:
        try:
            parsed = tuple(int(part) for part in text.split(","))
        except ValueError:
            parsed = ()
        if 1 <= len(parsed) <= 3 and all(v >= 0 for v in parsed):
            values = parsed
        else:
            logger.warning(
                "%s=%r is not one to three non-negative integers separated by commas "
                "(gc.set_threshold's arguments, e.g. 700,10,10); using %s",
                ENV, text, ",".join(map(str, THRESHOLDS)),
            )  # fmt: skip
    gc.set_threshold(*values)
    return values
