"""What a worker's shell stamps on the events it feeds its core.

The core takes time and stimulus ids from its events and never reads a clock itself;
these two give every part of the worker shell the same source for both.
"""

from __future__ import annotations

import time

import trio

__all__ = ["now", "stimulus"]


def now() -> float:
    """The event time: trio's clock (a ``MockClock`` in tests drives it)."""
    return trio.current_time()


def stimulus(kind: str) -> str:
    """A stimulus id: what caused the event, made unique by the wall clock."""
    return f"{kind}-{time.time()}"
