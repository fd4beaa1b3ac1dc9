"""The ``trioscheduler`` command (``scheduler``, ``worker``, ``demo``): the top layer.

May import every other package; nothing imports it (a nanny's child runs
``server.worker_process``, not this).
"""

from __future__ import annotations

from trioscheduler.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
