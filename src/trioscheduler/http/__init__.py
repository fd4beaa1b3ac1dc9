"""The scheduler's web side: the dashboard, ``/metrics``, ``/health`` and the JSON API.

This package owns everything served over HTTP by a scheduler: a small trio + h11 server
(``server.py``), one shared snapshot of the scheduler's state per update interval
(``snapshot.py``), the Bokeh pages built once and fed by polling (``pages.py``), plain
HTML ``/info`` pages (``info.py``), Prometheus metrics (``metrics.py``), BokehJS from the
installed ``bokeh`` (``static.py``), the task stream the scheduler records for it
(``task_stream.py``), the log buffers behind the ``/info`` log pages (``logs.py``, also
kept by each worker), and the HTML of ``performance_report`` (``report.py``). The routes
are in ``app.py``; ``docs/dashboard.md`` lists them.

It never imports the server shells at run time: the scheduler shell starts
``Dashboard(self).serve`` in its own nursery and is read through ``DashboardSource``
(``address``, ``state``, ``task_stream``). Bokeh, h11 and prometheus_client are the
``dashboard`` extra; they are imported only once a dashboard starts, so a scheduler
without one never pays for them. ``require_dashboard()`` names the extra when they are
missing.

May import: ``wire``, ``core`` (and ``errors``); never ``server`` (type hints only, under
``TYPE_CHECKING``).
"""

from __future__ import annotations

import importlib.util

from trioscheduler.errors import TrioSchedulerError

__all__ = [
    "DEFAULT_DASHBOARD_ADDRESS",
    "DashboardUnavailableError",
    "dashboard_available",
    "format_dashboard_link",
    "parse_dashboard_address",
    "require_dashboard",
    "resolve_dashboard_address",
]

EXTRA_MODULES = ("bokeh", "h11", "prometheus_client")
"""What ``pip install 'trioscheduler[dashboard]'`` brings (pyproject.toml)."""


class DashboardUnavailableError(TrioSchedulerError, ImportError):
    """A dashboard was asked for, but the ``dashboard`` extra is not installed."""


def _missing() -> list[str]:
    return [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]


def dashboard_available() -> bool:
    """Is the ``dashboard`` extra installed? (Looks for the modules, imports none.)"""
    return not _missing()


def require_dashboard() -> None:
    missing = _missing()
    if missing:
        raise DashboardUnavailableError(
            f"the dashboard needs the 'dashboard' extra ({', '.join(missing)} not installed): "
            "pip install 'trioscheduler[dashboard]', or pass dashboard_address=None"
        )


class _DefaultAddress(str):
    """A ``str`` that knows it is the default, not a user's explicit choice."""

    __slots__ = ()


DEFAULT_DASHBOARD_ADDRESS: str = _DefaultAddress(":8787")
"""dask's default (``LocalCluster``, ``trioscheduler scheduler``). Left as the default,
it means "a dashboard if the extra is installed": without the extra, no dashboard and
no error (dask's quiet fallback). Passed explicitly, a missing extra is an error."""


def resolve_dashboard_address(address: str | int | None) -> str | int | None:
    """The address to serve on, or None; raises if one was asked for and cannot be."""
    if address is None:
        return None
    if address is DEFAULT_DASHBOARD_ADDRESS:
        return address if dashboard_available() else None
    if isinstance(address, bool) or not isinstance(address, str | int):
        raise TypeError(
            f"dashboard_address must be ':PORT', 'HOST:PORT', a port number or None, "
            f"got {address!r:.100}"
        )
    parse_dashboard_address(address, "")  # a malformed address fails here, not at start
    require_dashboard()
    return address


def format_dashboard_link(host: str, port: int, fallback_host: str = "") -> str:
    """``http://host:port/status`` (dask's ``distributed.dashboard.link``); a wildcard
    bind (``0.0.0.0``) shows ``fallback_host``, the host its users reached the scheduler by."""
    if host in ("", "0.0.0.0", "::"):
        host = fallback_host if fallback_host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/status"


def parse_dashboard_address(address: str | int, default_host: str) -> tuple[str, int]:
    """``":8787"``, ``"8787"``, ``8787``, ``"host:port"``, ``"http://host:port"`` ->
    ``(host, port)``; no host means ``default_host`` (the scheduler's own host)."""
    if isinstance(address, int):
        return default_host, address
    text = str(address).strip()
    for scheme in ("http://", "https://"):
        if text.startswith(scheme):
            text = text[len(scheme) :]
    text = text.rstrip("/")
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(
            f"dashboard_address {address!r}: expected ':PORT', 'HOST:PORT' or a port number"
        ) from None
    if not 0 <= port <= 65535:
        raise ValueError(f"dashboard_address {address!r}: port out of range")
    return host or default_host, port
