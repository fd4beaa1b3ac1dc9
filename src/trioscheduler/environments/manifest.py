"""What an environment needs from a host, and whether a host has it.

A venv holds no interpreter of its own (its ``bin/python`` is a link to the base
interpreter of the machine that built it), so a host can run a shipped venv only with a
base interpreter of the same Python X.Y, implementation (``cache_tag``) and platform.
Compiled wheels also carry a glibc floor, so an older libc on the host is reported too.
A *prefix* environment (conda-pack) brings its own interpreter: only the platform must
match.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from trioscheduler.environments.errors import (
    EnvironmentArchiveError,
    IncompatibleEnvironmentError,
)

FORMAT = 1
ROOT = "env"  # every archive member lies under this directory
MANIFEST = "trioscheduler-env.json"
KINDS = ("venv", "prefix")

# Run by the interpreter being described; prints one JSON object. ``dists`` and
# ``trioscheduler`` only when describing an environment (sys.argv[1] == "dists").
_FACTS = r"""
import json, platform, sys, sysconfig
facts = {
    "python": "%d.%d" % sys.version_info[:2],
    "python_full": platform.python_version(),
    "cache_tag": sys.implementation.cache_tag,
    "platform": sysconfig.get_platform(),
    "soabi": sysconfig.get_config_var("SOABI"),
    "libc": " ".join(platform.libc_ver()).strip(),
    "base_executable": getattr(sys, "_base_executable", None) or sys.executable,
}
if sys.argv[1:] == ["dists"]:
    import importlib.metadata as md
    facts["dists"] = sorted({f"{d.metadata['Name']}=={d.version}" for d in md.distributions()
                             if d.metadata["Name"]})
    try:
        facts["trioscheduler"] = md.version("trioscheduler")
    except md.PackageNotFoundError:
        facts["trioscheduler"] = None
print(json.dumps(facts))
"""


def describe_interpreter(
    python: str, *, dists: bool = False, cwd: str | None = None
) -> dict[str, Any]:
    """The facts of the interpreter ``python`` (run with ``-P``, no user site, clean env)."""
    argv = [python, "-P", "-s", "-c", _FACTS] + (["dists"] if dists else [])
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=60, env=clean_environ({}), cwd=cwd
        )
    except OSError as exc:
        raise IncompatibleEnvironmentError(f"cannot run {python}: {exc}") from exc
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise IncompatibleEnvironmentError(f"{python} failed to describe itself: {tail}")
    facts: dict[str, Any] = json.loads(done.stdout)
    return facts


def own_facts() -> dict[str, Any]:
    """The facts of the interpreter running this code (the same as a base interpreter's)."""
    import platform
    import sysconfig

    return {
        "python": "{}.{}".format(*sys.version_info[:2]),
        "python_full": platform.python_version(),
        "cache_tag": sys.implementation.cache_tag,
        "platform": sysconfig.get_platform(),
        "soabi": sysconfig.get_config_var("SOABI"),
        "libc": " ".join(platform.libc_ver()).strip(),
        "base_executable": base_interpreter(),
    }


def base_interpreter() -> str:
    """The base interpreter of this process: the one its venv (if any) is a view on."""
    return str(getattr(sys, "_base_executable", None) or sys.executable)


def clean_environ(base: dict[str, str]) -> dict[str, str]:
    """``base`` without what would make an interpreter look outside its environment."""
    return {k: v for k, v in base.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def parse(text: bytes | str) -> dict[str, Any]:
    """A manifest read from an archive; anything else is an ``EnvironmentArchiveError``."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise EnvironmentArchiveError(f"the environment's {MANIFEST} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("kind") not in KINDS:
        raise EnvironmentArchiveError(
            f"the environment's {MANIFEST} is not a format-{FORMAT} manifest of a venv or "
            "a prefix (make the archive with `trioscheduler pack-env`)"
        )
    for key in ("python", "cache_tag", "platform"):
        if not isinstance(data.get(key), str):
            raise EnvironmentArchiveError(f"the environment's {MANIFEST} lacks {key!r}")
    return data


def _libc_older(env: str, host: str) -> bool:
    def split(text: str) -> tuple[str, tuple[int, ...]]:
        name, _, version = text.partition(" ")
        try:
            return name, tuple(int(p) for p in version.split("."))
        except ValueError:
            return name, ()

    (en, ev), (hn, hv) = split(env), split(host)
    return bool(en and en == hn and ev and hv and hv < ev)


def incompatibilities(manifest: dict[str, Any], host: dict[str, Any]) -> list[str]:
    """Why a host with facts ``host`` cannot run the environment; empty if it can."""
    keys = ("platform",) if manifest["kind"] == "prefix" else ("python", "cache_tag", "platform")
    problems = [
        f"{key}: env {manifest.get(key)!r} vs host {host.get(key)!r}"
        for key in keys
        if manifest.get(key) != host.get(key)
    ]
    return problems


def caveats(manifest: dict[str, Any], host: dict[str, Any]) -> list[str]:
    """What may still go wrong on a compatible host (worth a warning, not a refusal)."""
    env_libc, host_libc = str(manifest.get("libc") or ""), str(host.get("libc") or "")
    if _libc_older(env_libc, host_libc):
        return [
            f"the environment was built with {env_libc}, this host has the older "
            f"{host_libc}: compiled packages may fail to load"
        ]
    return []


def check(manifest: dict[str, Any], host: dict[str, Any]) -> None:
    """Raise ``IncompatibleEnvironmentError`` naming both sides of each difference."""
    problems = incompatibilities(manifest, host)
    if problems:
        raise IncompatibleEnvironmentError(
            "this host cannot run the environment: " + "; ".join(problems)
        )
