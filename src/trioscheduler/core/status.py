"""``Status``: the life-cycle states of servers and clients, with dask's names.

A ``str`` enum, so ``worker.status == Status.running`` holds for our objects, whose
``status`` attributes are the plain strings ``"running"``, ``"closed"``...
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Status"]


class Status(StrEnum):
    undefined = "undefined"
    created = "created"
    init = "init"
    starting = "starting"
    running = "running"
    paused = "paused"
    stopping = "stopping"
    stopped = "stopped"
    closing = "closing"
    closing_gracefully = "closing_gracefully"
    closed = "closed"
    failed = "failed"
    dont_reply = "dont_reply"

    def __str__(self) -> str:
        return f"Status.{self.name}"
