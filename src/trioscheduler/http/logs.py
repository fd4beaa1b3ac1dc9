"""The last lines logged in a process: one buffer per process, for dask's
``get_scheduler_logs`` / ``get_worker_logs``, a worker's ``get_logs`` op and the
dashboard's ``/info/.../logs``.

A ``logging.Handler`` on the ``trioscheduler`` logger with a bounded deque: one formatted
line (dask's format) per record that passes the logger's level (WARNING unless the
application lowers it; the buffer changes nothing about what gets logged), and no more
memory than ``LENGTH`` lines. Installed once per process (``install()``; a forked child
installs its own), never removed.
"""

from __future__ import annotations

import logging
import os
from collections import deque

__all__ = ["LENGTH", "LogBuffer", "install"]

LOGGER = "trioscheduler"
LENGTH = 10_000


class LogBuffer(logging.Handler):
    """The last ``n`` records of the ``trioscheduler`` loggers: ``(level, line)``."""

    buffer_only = True  # keeps lines, shows none (see ``emit``)

    def __init__(self, n: int = LENGTH) -> None:
        super().__init__()
        self.records: deque[tuple[str, str]] = deque(maxlen=n)
        self.pid = os.getpid()
        self.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.records.append((record.levelname, self.format(record)))
        except Exception:  # a log line must never break the process
            self.handleError(record)
            return
        # Any handler on the way up stops logging's last resort (warnings to stderr in a
        # program that configured no logging): we are not meant to swallow those, so
        # when no other handler will show the record, we hand it to the last resort.
        last = logging.lastResort
        if last is not None and record.levelno >= last.level and _alone(record):
            last.handle(record)

    def recent(self, n: int | None = None) -> list[tuple[str, str]]:
        """``[(level, line), ...]``, newest first (dask's order)."""
        records = list(reversed(self.records))
        return records if n is None else records[:n]

    def lines(self) -> list[str]:
        """The lines, oldest first (as a log file reads)."""
        return [line for _, line in self.records]


def _alone(record: logging.LogRecord) -> bool:
    """No handler but buffers on ``record``'s way up."""
    logger: logging.Logger | None = logging.getLogger(record.name)
    while logger is not None:
        if any(not getattr(h, "buffer_only", False) for h in logger.handlers):
            return False
        if not logger.propagate:
            break
        logger = logger.parent
    return True


_buffer: LogBuffer | None = None


def install() -> LogBuffer:
    """This process's buffer, on the ``trioscheduler`` logger from now on."""
    global _buffer
    log = logging.getLogger(LOGGER)
    # A forked worker process starts without its parent's handlers (nanny): a new buffer.
    if _buffer is None or _buffer.pid != os.getpid() or _buffer not in log.handlers:
        _buffer = LogBuffer()
        log.addHandler(_buffer)
    return _buffer
