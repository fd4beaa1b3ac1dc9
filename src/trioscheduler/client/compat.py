"""Names of ``distributed``'s package namespace that dask code imports beside ``Client``:
``print``/``warn`` from tasks, the error types, ``config``/``dask``, ``CompatibleExecutor``.

``print`` and ``warn`` inside a task do the usual thing on the worker and also send the
message to the scheduler's ``print``/``warn`` topics, which every client receives and
repeats locally (dask's behaviour: what a task prints shows up where the user looks).
"""

from __future__ import annotations

import builtins
import sys
import warnings
from concurrent.futures import CancelledError
from typing import Any

import dask
from dask.config import config

from trioscheduler.core.errors import KilledWorker
from trioscheduler.server import task_context

__all__ = [
    "CancelledError",
    "CompatibleExecutor",
    "KilledWorker",
    "TimeoutError",
    "config",
    "dask",
    "handle_print",
    "handle_warn",
    "print",
    "warn",
]

TimeoutError = builtins.TimeoutError  # noqa: A001 - dask's name, the builtin (as dask's)


def print(  # noqa: A001 - dask's name
    *args: Any, sep: str | None = " ", end: str | None = "\n", file: Any = None, flush: bool = False
) -> None:
    """``builtins.print``; inside a task, also printed by every client of the cluster."""
    worker = task_context.current_worker.get()
    if worker is not None:
        stream = 2 if file is sys.stderr else 1 if file in (None, sys.stdout) else None
        if stream is not None:
            msg = {"args": [str(a) for a in args], "sep": sep, "end": end, "file": stream}
            msg["flush"] = flush
            worker.log_event("print", msg)
    builtins.print(*args, sep=sep, end=end, file=file, flush=flush)


def warn(message: Any, category: type[Warning] | None = UserWarning, stacklevel: int = 1) -> None:
    """``warnings.warn``; inside a task, also warned by every client of the cluster."""
    worker = task_context.current_worker.get()
    if worker is not None:
        cat = category or UserWarning
        worker.log_event("warn", {"message": str(message), "category": cat.__name__})
    warnings.warn(message, category, stacklevel=stacklevel + 1)


def handle_print(event: tuple[float, Any]) -> None:
    """A client's handler of the ``print`` topic."""
    _, msg = event
    if not isinstance(msg, dict):
        builtins.print(msg)
        return
    file = sys.stderr if msg.get("file") == 2 else sys.stdout
    builtins.print(
        *msg.get("args", ()),
        sep=msg.get("sep", " "),
        end=msg.get("end", "\n"),
        file=file,
        flush=bool(msg.get("flush")),
    )


def handle_warn(event: tuple[float, Any]) -> None:
    """A client's handler of the ``warn`` topic: builtin warning categories keep theirs."""
    _, msg = event
    if not isinstance(msg, dict):
        warnings.warn(str(msg), UserWarning, stacklevel=2)
        return
    category = getattr(builtins, str(msg.get("category")), UserWarning)
    if not (isinstance(category, type) and issubclass(category, Warning)):
        category = UserWarning
    warnings.warn(str(msg.get("message")), category, stacklevel=2)


def CompatibleExecutor(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - dask's name
    """Moved, in dask too: use ``Client.get_executor()``."""
    raise TypeError("This has been moved to the Client.get_executor() method")

