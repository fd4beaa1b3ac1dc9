"""The last lines logged in a process, kept for ``/info/.../logs`` (dask's ``get_logs``).

Used by the scheduler's dashboard and by each worker (its data server's ``get_logs``
op): a ``logging.Handler`` on the ``trioscheduler`` logger with a bounded deque, so it
costs one formatted line per record that passes the logger's level, and no more memory
than ``n`` lines.
"""

from __future__ import annotations

import logging
from collections import deque

__all__ = ["LogBuffer"]


class LogBuffer(logging.Handler):
    """The last ``n`` records of the ``trioscheduler`` loggers, formatted, for ``/info``."""

    def __init__(self, n: int = 1000) -> None:
        super().__init__()
        self.lines: deque[str] = deque(maxlen=n)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a log line must never break the scheduler
            self.handleError(record)

    def attach(self) -> None:
        logging.getLogger("trioscheduler").addHandler(self)

    def detach(self) -> None:
        logging.getLogger("trioscheduler").removeHandler(self)
