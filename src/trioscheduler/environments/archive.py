"""The archive we ship: a tar.gz (level 1) of ``env/`` plus a JSON manifest.

Why tar and not zip: zip drops exec bits and symlinks, and its extraction stamps every
file with the current time, so every ``.pyc`` goes stale (measured: imports 2-4x slower
on a machine that does not rewrite bytecode). Level 1 because a 220 MB environment packs
in 2.5 s at level 1 and 20 s at level 9 for 15 % less data. A venv's ``bin/python*``
are left out: they are links to the builder's interpreter, meaningless elsewhere, and
the host re-creates them (``rebase``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from trioscheduler.environments import manifest as mf
from trioscheduler.environments.errors import (
    EnvironmentArchiveError,
    IncompatibleEnvironmentError,
)
from trioscheduler.environments.rebase import read_pyvenv_cfg

SUFFIXES = (".tar.gz", ".tgz")
_VENV_PYTHON = re.compile(r"bin/(python|pypy)[0-9.]*w?")
_MANIFEST_MAX = 4 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def kind_of(env: Path) -> str:
    """``"venv"`` (has ``pyvenv.cfg``) or ``"prefix"`` (has ``bin/python``); else an error."""
    if (env / "pyvenv.cfg").is_file():
        return "venv"
    if os.access(env / "bin" / "python", os.X_OK):
        return "prefix"
    raise EnvironmentArchiveError(
        f"{env} is neither a venv (no pyvenv.cfg) nor a prefix environment (no bin/python)"
    )


def _site_packages(env: Path) -> list[str]:
    return sorted(str(p) for p in env.glob("lib/python*/site-packages") if p.is_dir())


def _interpreter_for(env: Path, kind: str) -> list[str]:
    """Interpreters whose facts are the environment's, best first."""
    candidates = [str(env / "bin" / "python")]
    if kind == "venv":
        cfg = read_pyvenv_cfg(env / "pyvenv.cfg")
        if cfg.get("executable"):
            candidates.append(cfg["executable"])
        if cfg.get("home"):
            candidates += [os.path.join(cfg["home"], n) for n in ("python3", "python")]
    return candidates


def describe(env: Path) -> dict[str, Any]:
    """The manifest of environment directory ``env`` (refusing what cannot be shipped)."""
    kind = kind_of(env)
    if kind == "venv":
        cfg = read_pyvenv_cfg(env / "pyvenv.cfg")
        if cfg.get("include-system-site-packages", "false").lower() == "true":
            raise EnvironmentArchiveError(
                f"{env} includes the system site-packages (include-system-site-packages = "
                "true): those packages stay behind on this machine, so the environment "
                "would not be the same elsewhere; make it without --system-site-packages"
            )
    facts: dict[str, Any] | None = None
    errors = []
    for python in _interpreter_for(env, kind):
        try:
            facts = mf.describe_interpreter(python)
            break
        except IncompatibleEnvironmentError as exc:
            errors.append(str(exc))
    if facts is None:
        raise EnvironmentArchiveError(
            f"cannot tell which Python {env} is for: " + "; ".join(errors)
        )
    dists = list(metadata.distributions(path=_site_packages(env)))
    names = {str(d.metadata["Name"] or "").lower().replace("_", "-"): d.version for d in dists}
    return {
        "format": mf.FORMAT,
        "kind": kind,
        **facts,
        "dists": sorted(f"{d.metadata['Name']}=={d.version}" for d in dists if d.metadata["Name"]),
        "trioscheduler": names.get("trioscheduler"),
        "prefix": str(env.resolve()),
        "script_prefixes": script_prefixes(env),
    }


_SHEBANG = re.compile(rb"#!(/[^\s]*)/bin/python[0-9.]*\s*$")


def script_prefixes(env: Path) -> list[str]:
    """The venv paths that scripts in ``bin/`` name in their shebang (``#!<p>/bin/python``):
    the build path, or where the venv lay before it was copied or zipped."""
    found = set()
    bindir = env / "bin"
    for path in sorted(bindir.iterdir()) if bindir.is_dir() else ():
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                match = _SHEBANG.match(f.readline(4096))
            if match:
                found.add(match.group(1).decode(errors="replace"))
    return sorted(found)


def pack(source: str | os.PathLike[str], out: str | os.PathLike[str]) -> str:
    """Pack environment directory ``source`` into ``out`` (tar.gz); returns its sha256."""
    env = Path(source)
    if not env.is_dir():
        raise EnvironmentArchiveError(f"{source} is not a directory")
    info = describe(env)
    kind = info["kind"]

    def member(ti: tarfile.TarInfo) -> tarfile.TarInfo | None:
        rel = ti.name[len(mf.ROOT) + 1 :] if ti.name != mf.ROOT else ""
        if rel == mf.MANIFEST or (kind == "venv" and _VENV_PYTHON.fullmatch(rel)):
            return None
        if ti.isdev() or ti.isfifo():
            return None  # nothing an environment needs; extraction would refuse it
        if ti.issym() and os.path.isabs(ti.linkname):
            raise EnvironmentArchiveError(
                f"{env / rel} links to the absolute path {ti.linkname}, which other hosts "
                "lack: make the link relative or copy the file"
            )
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        # Whole seconds, which is all a .pyc records of its source: a float mtime costs
        # every member a PAX header, twice the headers to write and to read.
        ti.mtime = int(ti.mtime)
        return ti

    target = Path(out)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    try:
        # mtime=0 in the gzip header: the same directory packs to the same bytes, so to
        # the same id, which hosts then find in their cache.
        with (
            open(partial, "wb") as raw,
            gzip.GzipFile("", "wb", 1, raw, mtime=0) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            # The manifest first: a reader finds it without inflating the whole archive.
            data = json.dumps(info, indent=1, sort_keys=True).encode()
            ti = tarfile.TarInfo(f"{mf.ROOT}/{mf.MANIFEST}")
            ti.size, ti.mode = len(data), 0o644
            ti.mtime = int((env / ("pyvenv.cfg" if kind == "venv" else "bin")).stat().st_mtime)
            tar.addfile(ti, io.BytesIO(data))
            tar.add(env, arcname=mf.ROOT, filter=member)
        os.chmod(partial, 0o644)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return sha256_file(target)


def read_manifest(archive: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest inside ``archive``, checked; an ``EnvironmentArchiveError`` otherwise.

    ``pack`` writes it as the first member, so only that member is read.
    """
    name = f"{mf.ROOT}/{mf.MANIFEST}"
    try:
        with tarfile.open(archive, "r|gz") as tar:
            ti = tar.next()
            if ti is None or ti.name != name:
                raise EnvironmentArchiveError(
                    f"{archive} does not start with {name}: make it with `trioscheduler pack-env`"
                )
            if not ti.isfile() or ti.size > _MANIFEST_MAX:
                raise EnvironmentArchiveError(f"{archive}: {name} is not a small regular file")
            f = tar.extractfile(ti)
            assert f is not None
            return mf.parse(f.read())
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise EnvironmentArchiveError(f"{archive} is not a tar.gz archive: {exc}") from exc


def _from_zip(path: Path, workdir: Path) -> Path:
    """An environment directory made from a zip of 1.13's ``upload_environment``."""
    root = workdir / "unzipped"
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            parts = Path(name).parts
            if name.startswith("/") or ".." in parts:
                raise EnvironmentArchiveError(f"{path}: member {name!r} points outside the archive")
        zf.extractall(root)
    candidates = [root, *(p for p in root.iterdir() if p.is_dir())]
    for env in candidates:
        if (env / "pyvenv.cfg").is_file() or (env / "bin" / "python").is_file():
            for exe in (env / "bin").iterdir() if (env / "bin").is_dir() else ():
                exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            return env
    raise EnvironmentArchiveError(f"{path} holds no environment (no pyvenv.cfg, no bin/python)")


def for_upload(path: str | os.PathLike[str]) -> tuple[Path, str, Callable[[], None]]:
    """``(archive, sha256, cleanup)`` for a venv/prefix directory, a tar.gz or a zip."""
    p = Path(path)
    if not p.exists():
        raise EnvironmentArchiveError(f"{path} does not exist")
    if p.is_file() and p.name.endswith(SUFFIXES):
        read_manifest(p)
        return p, sha256_file(p), lambda: None
    workdir = Path(tempfile.mkdtemp(prefix="trioscheduler-pack-"))
    try:
        if p.is_file() and p.suffix == ".zip":
            env = _from_zip(p, workdir)
        elif p.is_dir():
            env = p
        else:
            raise EnvironmentArchiveError(
                f"{path}: an environment is a directory, a {' or '.join(SUFFIXES)} archive "
                "made by `trioscheduler pack-env`, or a .zip"
            )
        archive = workdir / "env.tar.gz"
        sha = pack(env, archive)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return archive, sha, lambda: shutil.rmtree(workdir, ignore_errors=True)
