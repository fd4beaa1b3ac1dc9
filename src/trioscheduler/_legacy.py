"""Module paths from before the subpackages (issue 11), kept importable.

Until 0.1 every module sat directly in ``trioscheduler/``; users may have written
``from trioscheduler.scheduler import Scheduler``. Each old path is a stand-in module in
``sys.modules`` that forwards every attribute to the module's new home, so the objects
are the very same ones (``isinstance`` and monkeypatching keep working) and nothing is
imported until an attribute is used. Being in ``sys.modules`` from the start, an old
path is never set as an attribute of the package by the import system: the public
functions ``trioscheduler.progress`` and ``trioscheduler.worker_client`` stay functions
after ``import trioscheduler.progress``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__all__ = ["MOVED", "install"]

MOVED = {
    "trioscheduler.cluster": "trioscheduler.deploy.cluster",
    "trioscheduler.collections": "trioscheduler.client.collections",
    "trioscheduler.datasets": "trioscheduler.client.datasets",
    "trioscheduler.execute": "trioscheduler.server.task_context",
    "trioscheduler.futures": "trioscheduler.client.futures",
    "trioscheduler.keys": "trioscheduler.client.keys",
    "trioscheduler.memory": "trioscheduler.server.memory",
    "trioscheduler.nanny": "trioscheduler.server.nanny",
    "trioscheduler.progress": "trioscheduler.client.progress",
    "trioscheduler.remote_error": "trioscheduler.wire.remote_error",
    "trioscheduler.runspec": "trioscheduler.wire.runspec",
    "trioscheduler.scheduler": "trioscheduler.server.scheduler",
    "trioscheduler.worker": "trioscheduler.server.worker",
    "trioscheduler.worker_client": "trioscheduler.client.worker_client",
}
"""Old module path -> where it lives now."""


class MovedModule(types.ModuleType):
    """An old module path: every attribute read, written or listed is the new module's."""

    def __init__(self, name: str, target: str) -> None:
        super().__init__(name, f"moved to {target}")
        object.__setattr__(self, "_target", target)

    def _module(self) -> types.ModuleType:
        return importlib.import_module(object.__getattribute__(self, "_target"))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._module(), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._module(), name)

    def __dir__(self) -> list[str]:
        return dir(self._module())


def install() -> None:
    for old, new in MOVED.items():
        sys.modules.setdefault(old, MovedModule(old, new))
