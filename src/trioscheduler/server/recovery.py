"""The Scheduler shell's side of a restart from its log (``recover_from``, docs/recovery.md).

Reading the file is ``event_log``'s; deciding what the replayed state does with the peers
coming back is the core's (``core/recovery.py``). Here: the replay itself, with a
warning for each thing a user should know (other settings given now than the log was
written with, another version of the code, a torn last frame dropped), and the task
that ``fsync``s the log.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import trio

from trioscheduler._version import __version__
from trioscheduler.core import recorder
from trioscheduler.core.scheduler import SchedulerState
from trioscheduler.server.event_log import EventLogWriter, LogContents, LogError

logger = logging.getLogger("trioscheduler.scheduler")


def replay(
    path: str | os.PathLike[str], contents: LogContents, wanted: dict[str, Any]
) -> tuple[SchedulerState, dict[str, Any]]:
    """The state ``contents`` describes (a pure replay: no effect goes anywhere) and the
    settings it was built with, which win over ``wanted`` (so the replay is faithful)."""
    head = contents.header
    assert head is not None
    kind, logged, _ = recorder.split_log([head])
    if kind != "scheduler":
        raise LogError(f"{path} is a {kind}'s log, not a scheduler's")
    given = recorder.header("scheduler", wanted)[3]
    differ = sorted(k for k in given if logged.get(k) != given[k])
    if differ:
        logger.warning(
            "recovering from %s with the settings it was written with; ignoring %s",
            path, ", ".join(f"{k}={given[k]!r} (log: {logged.get(k)!r})" for k in differ),
        )  # fmt: skip
    version = recorder.header_meta(head).get("version")
    if version != __version__:
        logger.warning(
            "%s was written by trioscheduler %s, this is %s: replaying anyway",
            path, version, __version__,
        )  # fmt: skip
    if contents.torn_bytes:
        logger.warning(
            "%s: dropped a torn last frame (%d bytes, a write cut short)", path, contents.torn_bytes
        )
    state: SchedulerState = recorder.replay(contents.records)
    logger.info(
        "recovered from %s: %d frames, %d tasks, %d workers and %d clients to await",
        path, contents.frames, len(state.tasks), len(state.workers), len(state.clients),
    )  # fmt: skip
    return state, logged


async def fsync_loop(log: EventLogWriter, interval: float) -> None:
    """``fsync`` the log at most every ``interval`` seconds, when it has news."""
    while True:
        await trio.sleep(interval)
        if log.dirty and log.fd >= 0:
            await trio.to_thread.run_sync(log.sync)
