"""How a worker starts inside an environment, checked before any worker stops.

The worker runs as ``<env>/bin/python -P -m trioscheduler worker ...``: ``-P`` keeps the
current directory off ``sys.path`` (a directory named like a package there would shadow
the environment's), and ``PYTHONPATH``, ``PYTHONHOME`` and ``VIRTUAL_ENV`` are removed so
nothing of the nanny's own environment leaks in.

The *preflight* runs the same interpreter the same way and imports what the worker will.
The environment's trioscheduler must be this cluster's version (the wire protocol
depends on it). If the environment has no trioscheduler at all, a *shim* directory
holding only a link to this (pure-Python) package is put on ``PYTHONPATH``, with a
warning; a dependency the environment lacks then fails the preflight with its name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from trioscheduler._version import __version__
from trioscheduler.environments.errors import IncompatibleEnvironmentError
from trioscheduler.environments.manifest import clean_environ

logger = logging.getLogger("trioscheduler.environments")

# The version first (a mismatch is the clearest reason), then what the worker process
# imports (``python -m trioscheduler`` runs ``cli.main``).
_PREFLIGHT = (
    "import trioscheduler\n"
    "print('trioscheduler', getattr(trioscheduler, '__version__', '?'), flush=True)\n"
    "import trioscheduler.cli.main\n"
)
_MISSING = re.compile(r"ModuleNotFoundError: No module named '([^']+)'")


@dataclass(frozen=True)
class LaunchSpec:
    """How to start a worker in environment ``env_id`` (a ready directory ``prefix``)."""

    env_id: str
    prefix: str
    python: str
    shim: str | None = None  # the PYTHONPATH that supplies trioscheduler, if needed

    def argv(self, args: list[str]) -> list[str]:
        return [self.python, "-P", "-m", "trioscheduler", *args]

    def environ(self, base: Mapping[str, str]) -> dict[str, str]:
        env = clean_environ(dict(base))
        if self.shim:
            env["PYTHONPATH"] = self.shim
        return env


def _package_dir() -> Path:
    return Path(__file__).resolve().parents[1]


def make_shim(root: Path) -> str:
    """A directory holding only links to this trioscheduler package (made once)."""
    package = _package_dir()
    shim = root / "shims" / hashlib.sha256(str(package).encode()).hexdigest()[:16]
    if not (shim / "trioscheduler").exists():
        shim.mkdir(parents=True, exist_ok=True)
        # A mypyc-compiled install keeps the compiled core's shared runtime next to the
        # package (``<hash>__mypyc.*.so``): it must be importable too.
        for source in [*package.parent.glob("*__mypyc*"), package]:
            tmp = shim / f".{source.name}-{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(source, target_is_directory=source.is_dir())
            os.replace(tmp, shim / source.name)
    return str(shim)


def _run_preflight(python: str, cwd: str, environ: dict[str, str]) -> tuple[int, str, str]:
    try:
        done = subprocess.run(
            [python, "-P", "-c", _PREFLIGHT],
            capture_output=True,
            text=True,
            cwd=cwd,
            env=environ,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise IncompatibleEnvironmentError(f"cannot run {python}: {exc}") from exc
    return done.returncode, done.stdout, done.stderr


def prepare_launch(
    env_id: str, prefix: Path, *, cwd: str, cache_root: Path, base_env: Mapping[str, str]
) -> LaunchSpec:
    """The ``LaunchSpec`` of ready environment ``prefix``, after a successful preflight."""
    python = str(prefix / "bin" / "python")
    spec = LaunchSpec(env_id, str(prefix), python)
    want = __version__
    code, out, err = _run_preflight(python, cwd, spec.environ(base_env))
    missing = _MISSING.search(err)
    if code != 0 and missing and missing.group(1) == "trioscheduler":
        spec = LaunchSpec(env_id, str(prefix), python, shim=make_shim(cache_root))
        logger.warning(
            "environment %s has no trioscheduler: using this nanny's trioscheduler %s "
            "(install 'trioscheduler==%s' into the environment to silence this)",
            env_id[:12],
            want,
            want,
        )
        code, out, err = _run_preflight(python, cwd, spec.environ(base_env))
        missing = _MISSING.search(err)
    have = out.strip().rpartition("trioscheduler ")[2] if "trioscheduler " in out else None
    if have is not None and have != want:
        raise IncompatibleEnvironmentError(
            f"the environment has trioscheduler {have}, the cluster runs {want}: "
            f"install 'trioscheduler=={want}' into it"
        )
    if code != 0:
        if missing:
            raise IncompatibleEnvironmentError(
                f"the environment lacks the module {missing.group(1)!r}, which trioscheduler "
                f"needs: install 'trioscheduler=={want}' (and so its dependencies) into it"
            )
        tail = (err.strip().splitlines() or [f"exit status {code}"])[-1]
        raise IncompatibleEnvironmentError(
            f"trioscheduler does not start in the environment: {tail}"
        )
    return spec
