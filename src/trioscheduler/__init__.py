"""trioscheduler: the dask.distributed API on trio structured concurrency.

Only public names live here; everything else is private to its module.
"""

from __future__ import annotations

from trioscheduler.errors import TrioSchedulerError, TrioSchedulerWarning

__all__ = ["TrioSchedulerError", "TrioSchedulerWarning"]
__version__ = "0.1.0"
