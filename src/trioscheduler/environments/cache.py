"""The host's cache of environments: ``<cache>/<sha256>/env``, extracted once per host.

The cache is per user (``mkdtemp`` makes each environment 0700) and shared by every
nanny of that user on the host. Nannies that want the same environment at once are
serialized by an ``flock`` on ``<cache>/.<sha256>.lock`` (released by the kernel if a
nanny dies), and an environment appears only by an atomic rename of a finished
temporary directory: a reader sees either nothing or a ready environment
(``<sha256>/.ready``), never a half-written one.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from trioscheduler.environments import manifest as mf
from trioscheduler.environments.archive import sha256_file
from trioscheduler.environments.errors import EnvironmentArchiveError
from trioscheduler.environments.extract import safe_extract
from trioscheduler.environments.rebase import rebase

logger = logging.getLogger("trioscheduler.environments")

CACHE_ENV = "TRIOSCHEDULER_ENV_CACHE"
READY = ".ready"


def default_cache_dir() -> Path:
    """``$TRIOSCHEDULER_ENV_CACHE``, else ``$XDG_CACHE_HOME/trioscheduler/envs``
    (``~/.cache`` by default), else ``<tmp>/trioscheduler-envs-<uid>``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if os.path.isdir(os.path.dirname(xdg) or "/") and os.access(
        os.path.dirname(xdg) or "/", os.W_OK
    ):
        return Path(xdg) / "trioscheduler" / "envs"
    return Path(tempfile.gettempdir()) / f"trioscheduler-envs-{os.getuid()}"


def check_id(env_id: object) -> str:
    """``env_id`` if it is a sha256 in hex (it becomes a path: nothing else may)."""
    if not (
        isinstance(env_id, str)
        and len(env_id) == 64
        and all(c in "0123456789abcdef" for c in env_id)
    ):
        raise EnvironmentArchiveError(f"{env_id!r:.80} is not an environment id (a sha256 in hex)")
    return env_id


def cached(root: Path, env_id: str) -> Path | None:
    """The ready environment ``env_id`` in cache ``root``, or None."""
    final = root / check_id(env_id)
    return final / mf.ROOT if (final / READY).exists() else None


@contextmanager
def host_lock(root: Path, env_id: str) -> Iterator[None]:
    """Hold the host-wide lock of ``env_id`` (blocks; call from a thread in async code)."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(root / f".{check_id(env_id)}.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def materialize(
    archive: str | os.PathLike[str],
    env_id: str,
    root: str | os.PathLike[str],
    *,
    python: str | None = None,
    verify: bool = True,
) -> Path:
    """The ready environment of ``archive`` (sha256 ``env_id``) in cache ``root``.

    Extracted, checked against ``python`` (default: this process's base interpreter)
    and re-based onto it the first time; found in the cache every later time.
    """
    root = Path(root)
    found = cached(root, env_id)
    if found is not None:
        return found
    with host_lock(root, env_id):
        return materialize_locked(archive, env_id, root, python=python, verify=verify)


def materialize_locked(
    archive: str | os.PathLike[str],
    env_id: str,
    root: Path,
    *,
    python: str | None = None,
    verify: bool = True,
) -> Path:
    """``materialize`` for a caller that holds ``host_lock(root, env_id)``."""
    found = cached(root, env_id)
    if found is not None:
        return found
    if verify and (actual := sha256_file(archive)) != env_id:
        raise EnvironmentArchiveError(
            f"{archive} has sha256 {actual}, not the environment id {env_id}"
        )
    final = root / env_id
    if final.exists():  # left by a nanny that died before marking it ready
        shutil.rmtree(final)
    python = python or mf.base_interpreter()
    facts = mf.own_facts() if python == mf.base_interpreter() else mf.describe_interpreter(python)
    tmp = Path(tempfile.mkdtemp(prefix=f".{env_id[:16]}-", dir=root))
    try:
        safe_extract(archive, tmp)
        manifest_path = tmp / mf.ROOT / mf.MANIFEST
        if not manifest_path.is_file():
            raise EnvironmentArchiveError(f"the archive holds no {mf.ROOT}/{mf.MANIFEST}")
        manifest = mf.parse(manifest_path.read_bytes())
        mf.check(manifest, facts)
        for caveat in mf.caveats(manifest, facts):
            logger.warning("environment %s: %s", env_id[:12], caveat)
        if manifest["kind"] == "venv":
            old = [manifest.get("prefix"), *manifest.get("script_prefixes", ())]
            rebase(tmp / mf.ROOT, final / mf.ROOT, python, facts, [p for p in old if p])
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        unpack = final / mf.ROOT / "bin" / "conda-unpack"
        if manifest["kind"] == "prefix" and unpack.is_file():
            # conda-pack's fixer rewrites the build prefix to where it now lies: run it
            # in place, once, before the environment counts as ready.
            done = subprocess.run(
                [str(unpack)],
                capture_output=True,
                text=True,
                env=mf.clean_environ(dict(os.environ)),
            )
            if done.returncode != 0:
                raise EnvironmentArchiveError(
                    f"bin/conda-unpack failed (exit {done.returncode}): {done.stderr.strip()[-500:]}"
                )
        (final / READY).write_text(env_id + "\n")
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise
    return final / mf.ROOT
