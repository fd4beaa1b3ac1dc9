"""What a worker measures of itself on a timer: the heartbeat's metrics for the
scheduler (and its dashboards and task stream), and the process memory its core's
memory policy decides on (``MemoryMeasured``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import psutil
import trio

from trioscheduler.core import shm_policy
from trioscheduler.core.messages import MemoryMeasured, WorkerHeartbeat
from trioscheduler.server.stimuli import now as _now
from trioscheduler.server.stimuli import stimulus as _stimulus
from trioscheduler.wire import shm

if TYPE_CHECKING:
    from trioscheduler.server.worker import Worker

__all__ = ["heartbeat_loop", "memory_loop", "metrics"]


async def heartbeat_loop(w: Worker) -> None:
    while True:
        await trio.sleep(w.heartbeat_interval)
        report = metrics(w)
        # the fetches since the last heartbeat, for the scheduler's task stream
        report["transfers"], w._transfers = w._transfers, []
        w._send(
            WorkerHeartbeat(
                stimulus_id=_stimulus("heartbeat"), now=_now(), worker=w.address, metrics=report
            )
        )


def metrics(w: Worker) -> dict[str, Any]:
    """What the heartbeat tells the scheduler (and dashboards) about ``w``."""
    store = w.store
    state = w.state
    return {
        "time": time.time(),
        "memory": _memory(w),
        "memory_limit": w.memory_limit or 0,
        "managed_bytes": getattr(state, "managed_bytes", 0),
        "spilled_bytes": store.spilled_bytes if store is not None else 0,
        "spilled_keys": len(store.spilled) if store is not None else 0,
        "in_memory": len(store.memory) if store is not None else 0,
        "executing": len(w._executing),
        "status": getattr(state, "status", w.status),
        "cpu": _cpu_percent(w._process),
    }


async def memory_loop(w: Worker) -> None:
    while True:
        rss = _memory(w)
        if w.shared_memory:
            target = next((f for f in w._thresholds if f is not None), None)
            if shm.free_bytes() and shm_policy.release_free_segments(
                rss, w.memory_limit or 0, target
            ):
                shm.release_segments()
                rss = _memory(w)
        w.handle(
            MemoryMeasured(stimulus_id=_stimulus("memory-measured"), now=_now(), process_memory=rss)
        )
        await trio.sleep(w.memory_monitor_interval)


def _memory(w: Worker) -> int:
    """The process's memory, shared segments counted once per host (by their creator)."""
    rss = _rss(w._process)
    if w.shared_memory:
        rss = shm_policy.process_memory(rss, shm.rss_shared(), shm.owned_bytes())
    return rss


def _rss(process: psutil.Process) -> int:
    try:
        return int(process.memory_info().rss)
    except psutil.Error:
        return 0


def _cpu_percent(process: psutil.Process) -> float:
    try:
        return float(process.cpu_percent(None))  # since the previous call
    except psutil.Error:
        return 0.0
