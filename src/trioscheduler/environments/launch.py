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
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from trioscheduler._version import __version__
from trioscheduler.environments.errors import IncompatibleEnvironmentError
from trioscheduler.environments.manifest import clean_environ

logger = logging.getLogger("trioscheduler.environments")

BASE = "base"

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
    """How to start a worker in environment ``env_id`` (a ready directory ``prefix``), or
    in the base environment under another interpreter (``env_id == "base"``)."""

    env_id: str
    prefix: str
    python: str
    shim: str | None = None  # the PYTHONPATH that supplies trioscheduler, if needed

    def argv(self, args: list[str]) -> list[str]:
        return [self.python, "-P", "-m", "trioscheduler", *args]

    def environ(self, base: Mapping[str, str]) -> dict[str, str]:
        if self.env_id == BASE:
            # Another interpreter in the base environment (``Nanny(python=...)``): the
            # nanny's PYTHONPATH (the user's own directories) stays, as for any worker.
            env = {k: v for k, v in base.items() if k not in ("PYTHONHOME", "VIRTUAL_ENV")}
            path = [self.shim or "", env.get("PYTHONPATH", "")]
        else:
            env = clean_environ(dict(base))
            path = [self.shim or ""]
        if any(path):
            env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
        return env


def resolve_python(python: str | os.PathLike[str] | None) -> str | None:
    """``python`` (``Nanny(python=...)``) as an absolute path to an executable, or a clear
    error now rather than at the first start of a worker."""
    if python is None:
        return None
    found = shutil.which(os.fspath(python))
    if found is None:
        raise ValueError(f"python={python!r} is not an executable interpreter (nor on PATH)")
    return os.path.abspath(found)


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


def _preflight_record(prefix: Path, python: str) -> Path:
    """Where a passed preflight of ``prefix`` is remembered: in its cache entry, keyed by
    everything the preflight's outcome depends on (the entry itself never changes)."""
    key = "\0".join([os.path.realpath(python), __version__, str(_package_dir())])
    return prefix.parent / f".preflight-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def preflight_done(prefix: Path) -> bool:
    """Has a nanny of this host passed the preflight of ``prefix`` (as ``prepare_launch``
    would run it)?"""
    return _preflight_record(prefix, str(prefix / "bin" / "python")).exists()


def prepare_launch(
    env_id: str, prefix: Path, *, cwd: str, cache_root: Path, base_env: Mapping[str, str]
) -> LaunchSpec:
    """The ``LaunchSpec`` of ready environment ``prefix``, after a successful preflight
    (run once per host: the nannies of a host share its outcome)."""
    python = str(prefix / "bin" / "python")
    record = _preflight_record(prefix, python)
    try:
        shim = record.read_text().strip() or None
    except OSError:
        pass
    else:
        if shim is None or os.path.isdir(shim):
            return LaunchSpec(env_id, str(prefix), python, shim)
    spec = preflight(env_id, str(prefix), python, cwd=cwd, cache_root=cache_root, base_env=base_env)
    tmp = record.with_name(f"{record.name}.{os.getpid()}")
    tmp.write_text(spec.shim or "")
    os.replace(tmp, record)
    return spec


def preflight(
    env_id: str,
    prefix: str,
    python: str,
    *,
    cwd: str,
    cache_root: Path,
    base_env: Mapping[str, str],
) -> LaunchSpec:
    """Run interpreter ``python`` as the worker will and import what it will: the
    ``LaunchSpec`` that works (with a shim if trioscheduler is missing), or an error
    naming what is wrong."""
    spec = LaunchSpec(env_id, prefix, python)
    want = __version__
    code, out, err = _run_preflight(python, cwd, spec.environ(base_env))
    missing = _MISSING.search(err)
    if code != 0 and missing and missing.group(1) == "trioscheduler":
        spec = LaunchSpec(env_id, prefix, python, shim=make_shim(cache_root))
        logger.warning(
            "%s has no trioscheduler: using this nanny's trioscheduler %s "
            "(install 'trioscheduler==%s' into it to silence this)",
            f"environment {env_id[:12]}" if env_id != BASE else python,
            want,
            want,
        )
        code, out, err = _run_preflight(python, cwd, spec.environ(base_env))
        missing = _MISSING.search(err)
    have = out.strip().rpartition("trioscheduler ")[2] if "trioscheduler " in out else None
    where = "the environment" if env_id != BASE else python
    if have is not None and have != want:
        raise IncompatibleEnvironmentError(
            f"{where} has trioscheduler {have}, the cluster runs {want}: "
            f"install 'trioscheduler=={want}' into it"
        )
    if code != 0:
        if missing:
            raise IncompatibleEnvironmentError(
                f"{where} lacks the module {missing.group(1)!r}, which trioscheduler "
                f"needs: install 'trioscheduler=={want}' (and so its dependencies) into it"
            )
        tail = (err.strip().splitlines() or [f"exit status {code}"])[-1]
        raise IncompatibleEnvironmentError(f"trioscheduler does not start in {where}: {tail}")
    return spec
