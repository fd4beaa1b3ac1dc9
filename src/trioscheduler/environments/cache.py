"""The host's cache of environments: ``<cache>/<entry>/env``, extracted once per host.

The cache is per user (``mkdtemp`` makes each environment 0700) and shared by every
nanny of that user on the host. An entry is named by the environment's sha256; a nanny
that re-bases it onto another interpreter than the one its first maker used
(``Nanny(python=...)``) gets ``<sha256>-<interpreter tag>`` instead, since a re-based
venv points at one interpreter.

Nannies that want the same environment at once are serialized by an ``flock`` on
``<cache>/.<sha256>.lock`` (released by the kernel if a nanny dies), and an entry
appears only by an atomic rename of a finished temporary directory: a reader sees
either nothing or a ready entry (``.ready``, JSON: id, interpreter, size), never a
half-written one.

While a worker runs in an entry, its nanny holds a shared ``flock`` on the entry's
``.in-use`` (a ``Lease``); eviction (``evict``) removes only entries whose ``.in-use`` it
can lock exclusively, by first renaming them out of the way, and a nanny that takes a
lease checks afterwards that the entry is still the one in place. The mtime of
``.in-use`` is the entry's last use.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trioscheduler.environments import manifest as mf
from trioscheduler.environments.archive import sha256_file
from trioscheduler.environments.errors import EnvironmentArchiveError
from trioscheduler.environments.extract import safe_extract
from trioscheduler.environments.rebase import rebase

logger = logging.getLogger("trioscheduler.environments")

CACHE_ENV = "TRIOSCHEDULER_ENV_CACHE"
READY = ".ready"
IN_USE = ".in-use"


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


def read_ready(entry: Path) -> dict[str, Any] | None:
    """The ``.ready`` record of ``entry``, or None (absent, or not ours)."""
    try:
        data = json.loads((entry / READY).read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("python"), str) else None


def entry_for(root: Path, env_id: str, python: str) -> Path:
    """The entry of ``env_id`` re-based onto ``python`` (made or to be made)."""
    plain = root / check_id(env_id)
    ready = read_ready(plain)
    if ready is None or ready["python"] == os.path.realpath(python):
        return plain
    tag = hashlib.sha256(os.path.realpath(python).encode()).hexdigest()[:12]
    return root / f"{env_id}-{tag}"


class Lease:
    """A shared lock on an entry's ``.in-use``: eviction leaves the entry alone while
    any nanny holds one. Released by ``release()``, or by the kernel when the process
    ends."""

    __slots__ = ("entry", "fd")

    def __init__(self, entry: Path, fd: int) -> None:
        self.entry = entry
        self.fd: int | None = fd

    @property
    def prefix(self) -> Path:
        return self.entry / mf.ROOT

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _lock_in_use(path: Path) -> int:
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def acquire(root: Path, env_id: str, python: str | None = None) -> Lease | None:
    """A lease on the ready entry of ``env_id`` for ``python``, or None if there is none."""
    entry = entry_for(root, env_id, python or mf.base_interpreter())
    if read_ready(entry) is None:
        return None
    try:
        fd = os.open(entry / IN_USE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        # Blocks only while an evictor holds it exclusively, for the moment of a rename.
        fcntl.flock(fd, fcntl.LOCK_SH)
        if os.stat(entry / IN_USE).st_ino != os.fstat(fd).st_ino or read_ready(entry) is None:
            raise FileNotFoundError  # evicted meanwhile: this fd is in the evicted copy
        os.utime(fd)  # its last use, which eviction orders by
    except FileNotFoundError:
        os.close(fd)
        return None
    return Lease(entry, fd)


@contextmanager
def host_lock(root: Path, env_id: str) -> Iterator[None]:
    """Hold the host-wide lock of ``env_id`` (blocks; call from a thread in async code)."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(root / f".{check_id(env_id)}.lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
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
    lease = materialize_leased(archive, env_id, Path(root), python=python, verify=verify)
    lease.release()
    return lease.prefix


def materialize_leased(
    archive: str | os.PathLike[str],
    env_id: str,
    root: Path,
    *,
    python: str | None = None,
    verify: bool = True,
) -> Lease:
    """``materialize``, returning the entry leased (see ``Lease``)."""
    lease = acquire(root, env_id, python)
    if lease is not None:
        return lease

    def fill(tmp: Path) -> int:
        if verify and (actual := sha256_file(archive)) != env_id:
            raise EnvironmentArchiveError(
                f"{archive} has sha256 {actual}, not the environment id {env_id}"
            )
        return safe_extract(archive, tmp)

    with host_lock(root, env_id):
        return build(fill, env_id, root, python=python)


def build(
    fill: Callable[[Path], int], env_id: str, root: Path, *, python: str | None = None
) -> Lease:
    """Make the entry of ``env_id`` unless there is one; the caller holds ``host_lock``.

    ``fill(tmp)`` extracts the archive into ``tmp`` (raising if it is not ``env_id``)
    and returns the bytes written.
    """
    lease = acquire(root, env_id, python)
    if lease is not None:
        return lease
    python = python or mf.base_interpreter()
    facts = mf.own_facts() if python == mf.base_interpreter() else mf.describe_interpreter(python)
    final = entry_for(root, env_id, python)
    if final.exists():  # left by a nanny that died before marking it ready
        shutil.rmtree(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{env_id}-", dir=root))
    fd: int | None = None
    try:
        size = fill(tmp)
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
        fd = _lock_in_use(tmp / IN_USE)  # leased before anyone can see it
        os.rename(tmp, final)
    except BaseException:
        if fd is not None:
            os.close(fd)
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
        record = {"id": env_id, "python": os.path.realpath(python), "size": size}
        (final / (READY + ".tmp")).write_text(json.dumps(record) + "\n")
        os.replace(final / (READY + ".tmp"), final / READY)
    except BaseException:
        os.close(fd)
        shutil.rmtree(final, ignore_errors=True)
        raise
    return Lease(final, fd)
