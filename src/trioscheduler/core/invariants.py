"""``validate(state)``: every promise of a core, whichever core it is.

Dispatches on the state's type to ``validate_scheduler`` or ``validate_worker`` (each
beside its own core), so tests, the simulator and the recorder need one name only.
"""

from __future__ import annotations

from typing import Any

from trioscheduler.core.scheduler import SchedulerState
from trioscheduler.core.scheduler_invariants import validate_scheduler
from trioscheduler.core.worker import WorkerState
from trioscheduler.core.worker_invariants import validate_worker


def validate(state: Any) -> None:
    """Raise ``AssertionError`` naming the first broken invariant of ``state``.

    ``state`` is a ``SchedulerState`` or a ``WorkerState`` (or anything with a ``state``
    attribute holding one, such as a ``Recorder``).
    """
    t = type(state)
    if t is SchedulerState:
        validate_scheduler(state)
    elif t is WorkerState:
        validate_worker(state)
    elif hasattr(state, "state"):
        validate(state.state)
    else:
        raise TypeError(f"validate() needs a SchedulerState or WorkerState, not {t.__name__}")
