"""The exception and warning roots: every error we raise on purpose derives from these."""

from __future__ import annotations


class TrioSchedulerError(Exception):
    """Root of every error trioscheduler raises on purpose."""


class TrioSchedulerWarning(UserWarning):
    """Root of every warning trioscheduler emits (tests turn these into errors)."""
