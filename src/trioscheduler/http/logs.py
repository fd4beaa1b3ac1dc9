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

LOGGER = "trioscheduler"


class LogBuffer(logging.Handler):
    """The last ``n`` records of the ``trioscheduler`` loggers, formatted, for ``/info``."""

    buffer_only = True  # a handler that shows nothing (other buffers say so too)

    def __init__(self, n: int = 1000) -> None:
        super().__init__()
        self.lines: deque[str] = deque(maxlen=n)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a log line must never break the scheduler
            self.handleError(record)
            return
        # Any handler on the way up stops logging's last resort (warnings to stderr in a
        # program that configured no logging): we are not meant to swallow those, so the
        # first buffer hands such a record to the last resort itself.
        last = logging.lastResort
        if last is not None and record.levelno >= last.level and self._first_alone(record):
            last.handle(record)

    def _first_alone(self, record: logging.LogRecord) -> bool:
        """Am I the first buffer, and is there no other handler for ``record``?"""
        ours = logging.getLogger(LOGGER)
        if next((h for h in ours.handlers if isinstance(h, LogBuffer)), None) is not self:
            return False
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(not getattr(h, "buffer_only", False) for h in logger.handlers):
                return False
            if not logger.propagate:
                break
            logger = logger.parent
        return True

    def attach(self) -> None:
        logging.getLogger(LOGGER).addHandler(self)

    def detach(self) -> None:
        logging.getLogger(LOGGER).removeHandler(self)
