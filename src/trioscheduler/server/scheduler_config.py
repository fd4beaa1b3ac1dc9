"""The scheduler's settings that dask users set in dask's config, read and checked in one
place: a bad value fails at start-up, naming the setting."""

from __future__ import annotations

from typing import Any

AMM_INTERVAL = 2.0  # dask's distributed.scheduler.active-memory-manager.interval


def _seconds(value: Any, name: str, *, positive: bool) -> float:
    from dask.utils import parse_timedelta

    seconds = parse_timedelta(value, default="seconds")
    if seconds is None or not (seconds > 0 if positive else seconds >= 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a duration {bound}, got {value!r}")
    return float(seconds)


def amm_config() -> tuple[bool, float]:
    """dask's ``distributed.scheduler.active-memory-manager`` ``start`` and ``interval``
    (seconds): whether the scheduler starts the AMM, and how often it runs."""
    import dask.config

    key = "distributed.scheduler.active-memory-manager"
    start = bool(dask.config.get(f"{key}.start", True))
    interval = dask.config.get(f"{key}.interval", AMM_INTERVAL)
    return start, _seconds(interval, f"{key}.interval", positive=False)


def no_workers_timeout(value: float | str | None) -> float | None:
    """Seconds, or None; ``"config"``: dask's ``distributed.scheduler.no-workers-timeout``."""
    if value == "config":
        import dask.config

        value = dask.config.get("distributed.scheduler.no-workers-timeout", None)
    if value is None:
        return None
    return _seconds(value, "no_workers_timeout", positive=True)
