"""Waiting for another component's state where it offers no event to wait on.

The async form is bounded by the test's ``trio.fail_after``; the sync form (a test
driving a cluster from its own thread) by its ``timeout``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import trio


async def wait_until(predicate: Callable[[], Any], interval: float = 0.01) -> None:
    """Until ``predicate()`` is true, polling every ``interval`` seconds."""
    while not predicate():  # noqa: ASYNC110 - another component's state, no event to wait on
        await trio.sleep(interval)


def eventually(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """``check()``'s first truthy result; fails naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
