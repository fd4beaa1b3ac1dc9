"""Build: the pure core is compiled with mypyc when this machine can; else pure Python.

The state machines in ``trioscheduler.core`` are plain, fully typed Python; mypyc turns
them into C extensions that run the same code 1.5-2x faster (docs/performance.md). The
compiled modules and the ``.py`` files are installed side by side (an extension module
wins the import), so behaviour is the same either way; ``trioscheduler.core.COMPILED``
says which one runs.

Compiled only for a wheel or a plain install, never for an editable one (a developer's
edits to a ``.py`` file must take effect), nor with ``TRIOSCHEDULER_PURE_PYTHON=1``. A
machine without mypy or a C compiler gets the pure-Python package and a warning.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

CORE = Path("src/trioscheduler/core")
COMPILED = [
    "memory_policy.py",
    "placement.py",
    "replicas.py",
    "replication.py",
    "scheduler.py",
    "scheduler_client_events.py",
    "scheduler_records.py",
    "scheduler_retirement.py",
    "scheduler_transitions.py",
    "stealing.py",
    "story.py",
    "worker.py",
    "worker_decisions.py",
    "worker_task.py",
    "worker_transitions.py",
]
"""The hot modules. Left interpreted: ``empty`` (a dict subclass, which mypyc cannot
compile), ``messages`` and ``records`` (dataclass_transform machinery read by the wire), ``errors``,
``recorder``, ``simulator`` and the invariant checks (test-time code)."""

BUILDS = {"bdist_wheel", "build", "build_ext", "install"}


def _warn(text: str) -> None:
    print(f"trioscheduler: {text}; installing the pure-Python core", file=sys.stderr)


def core_extensions() -> list[Any]:
    if os.environ.get("TRIOSCHEDULER_PURE_PYTHON") or platform.python_implementation() != "CPython":
        return []
    if "editable_wheel" in sys.argv or not BUILDS.intersection(sys.argv):
        return []  # an editable install, or only metadata: nothing to compile
    try:
        from mypyc.build import mypycify
    except ImportError:
        _warn("mypyc is not installed")
        return []
    # Only the core is type-checked here: the shells it imports through the package
    # (trio, dask, ...) are not installed in pip's isolated build environment, so their
    # errors are silenced (``nox -s lint`` checks them with everything installed).
    flags = ["--follow-imports=silent", "--ignore-missing-imports", "--no-warn-unused-ignores"]
    try:
        return list(mypycify([*flags, *(str(CORE / name) for name in COMPILED)], opt_level="3"))
    except (Exception, SystemExit) as exc:  # mypyc refused the code (it exits on type errors)
        _warn(f"mypyc failed ({exc!r:.200})")
        return []


class OptionalBuildExt(build_ext):
    """Build the compiled core, or nothing: a half-built set of extensions would import
    a shared library that is not there, so a failure removes whatever was built."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler, no Python headers, ...
            _warn(f"compiling the core failed ({exc!r:.200})")
            for ext in self.extensions:
                path = self.get_ext_fullpath(ext.name)
                if os.path.exists(path):
                    os.remove(path)
            self.extensions = []


setup(ext_modules=core_extensions(), cmdclass={"build_ext": OptionalBuildExt})
