"""Re-basing a shipped venv onto this host's interpreter (about 20 ms).

A venv is a view on a base interpreter: ``pyvenv.cfg`` names its ``home``, and
``bin/python*`` link to it. Shipped to another host both point at the builder's
interpreter, so the host rewrites ``pyvenv.cfg`` for its own same-X.Y interpreter,
re-creates the links, and rewrites console-script shebangs that name the build path to
the environment's final path (users' ``subprocess`` calls to ``bin/tool`` need them; the
worker itself starts with ``python -m``). ``python -m venv --upgrade`` would do half of
it, and only after the old links were removed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_SHEBANG_MAX = 4096


def read_pyvenv_cfg(path: Path) -> dict[str, str]:
    """``key = value`` lines of a ``pyvenv.cfg`` (keys lower-cased)."""
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip().lower()] = value.strip()
    return out


def rebase(
    env: Path, final: Path, python: str, facts: dict[str, Any], old_prefixes: list[str]
) -> None:
    """Make venv ``env`` (to be renamed to ``final``) run on interpreter ``python``.

    ``facts`` are that interpreter's (``manifest.own_facts``); ``old_prefixes`` are the
    venv's paths on the machine that built it (console scripts name them).
    """
    cfg_path = env / "pyvenv.cfg"
    lines = cfg_path.read_text(encoding="utf-8").splitlines()
    fresh = {
        "home": os.path.dirname(python),
        "executable": os.path.realpath(python),
        "version": facts["python_full"],
        "version_info": facts["python_full"],
    }
    out, seen = [], set()
    for line in lines:
        key = line.partition("=")[0].strip().lower()
        if key == "command":
            continue  # names the builder's paths; nothing reads it
        if key in fresh:
            out.append(f"{key} = {fresh[key]}")
            seen.add(key)
        else:
            out.append(line)
    out += [f"{k} = {v}" for k, v in fresh.items() if k not in seen and k != "version_info"]
    cfg_path.write_text("\n".join(out) + "\n", encoding="utf-8")

    bindir = env / "bin"
    bindir.mkdir(exist_ok=True)
    major = facts["python"].split(".")[0]
    for name in ("python", f"python{major}", f"python{facts['python']}"):
        link = bindir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(python)
    for old in old_prefixes:
        rewrite_shebangs(bindir, old, str(final))


def rewrite_shebangs(bindir: Path, old_prefix: str, new_prefix: str) -> list[str]:
    """Point ``#!<old_prefix>/bin/python...`` scripts in ``bindir`` at ``new_prefix``."""
    old = f"#!{old_prefix.rstrip('/')}/bin/".encode()
    new = f"#!{new_prefix.rstrip('/')}/bin/".encode()
    changed = []
    for path in sorted(bindir.iterdir()):
        if path.is_symlink() or not path.is_file():
            continue
        with open(path, "rb") as f:
            head = f.read(len(old))
            if head != old:
                continue
            body = head + f.read()
        first, nl, rest = body.partition(b"\n")
        if len(first) > _SHEBANG_MAX or not first[len(old) :].startswith(b"python"):
            continue
        mode = path.stat().st_mode
        tmp = path.with_name(path.name + ".rebase")
        tmp.write_bytes(new + first[len(old) :] + nl + rest)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        changed.append(path.name)
    return changed
