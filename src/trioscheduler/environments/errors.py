"""The errors of shipped environments (all ``TrioSchedulerError``)."""

from __future__ import annotations

from trioscheduler.errors import TrioSchedulerError


class EnvironmentArchiveError(TrioSchedulerError, ValueError):
    """A directory or archive is not something we can ship (the message says why)."""


class UnsafeArchiveError(EnvironmentArchiveError):
    """An archive member would land outside the environment, or is a device or link
    that an environment has no business holding; nothing is extracted."""


class IncompatibleEnvironmentError(TrioSchedulerError):
    """This host cannot run the environment (Python version, platform, trioscheduler)."""


class EnvironmentRefusedError(TrioSchedulerError):
    """``restart(environment=...)`` was refused before any worker stopped.

    ``reasons`` maps each worker that could not prepare the environment to why.
    """

    def __init__(self, message: str, reasons: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.reasons = dict(reasons or {})
