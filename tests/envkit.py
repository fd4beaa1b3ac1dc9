"""Real venvs for the environment tests, built offline in about a second.

``python -m venv --without-pip`` (milliseconds), then a ``marker`` package that no other
environment has, built here as a wheel (no build backend, no network) and installed with
pip's ``--python`` into the venv, so pip writes its console script ``marker-hello`` with
the venv's shebang, as for any real install. The venv sees the test runner's packages
(trio, msgpack, this trioscheduler...) through a ``.pth`` overlay: ``addsitedir`` so
that the runner's own ``.pth`` files (an editable trioscheduler) count too.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

MARKER_VERSION = "shipped-1"
_MARKER = """
import sys

VERSION = {version!r}


def hello() -> None:
    print("marker", VERSION, sys.prefix)
"""


def runner_site_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def site_packages(env: Path) -> Path:
    return env / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def make_venv(env: Path, *, overlay: str | None = "addsitedir", system_site: bool = False) -> Path:
    """A bare venv; ``overlay``: ``"addsitedir"`` (runner packages, editable ones too),
    ``"plain"`` (the runner's packages but trioscheduler: links to every other entry of
    its site-packages, .pth files left out, so neither an installed nor an editable
    trioscheduler shows), or None (nothing of the runner's)."""
    venv.EnvBuilder(with_pip=False, symlinks=True, system_site_packages=system_site).create(env)
    sp = site_packages(env)
    if overlay == "addsitedir":
        lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in runner_site_dirs())
        (sp / "zz_runner.pth").write_text(lines)
    elif overlay == "plain":
        deps = env.parent / f"{env.name}-runner-deps"  # outside: packing refuses links out
        deps.mkdir()
        for site_dir in runner_site_dirs():
            for entry in Path(site_dir).iterdir():
                name = entry.name
                if name.startswith(("trioscheduler", "__editable__")) or name.endswith(".pth"):
                    continue
                if not (deps / name).exists():
                    (deps / name).symlink_to(entry)
        (sp / "zz_runner.pth").write_text(f"{deps}\n")
    return env


def marker_wheel(directory: Path, version: str = MARKER_VERSION) -> Path:
    """A pure-Python wheel of ``marker`` with a ``marker-hello`` console script."""
    dist = "marker-1.0.dist-info"
    files = {
        "marker.py": _MARKER.format(version=version).encode(),
        f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: marker\nVersion: 1.0\n",
        f"{dist}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: envkit\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
        f"{dist}/entry_points.txt": b"[console_scripts]\nmarker-hello = marker:hello\n",
    }
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        writer.writerow([name, f"sha256={digest}", len(data)])
    writer.writerow([f"{dist}/RECORD", "", ""])
    path = directory / "marker-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}/RECORD", record.getvalue())
    return path


def install_marker(env: Path, wheel: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install",
         "--quiet", "--no-index", "--no-deps", "--disable-pip-version-check", str(wheel)],
        check=True,
        env={**os.environ, "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull},
    )  # fmt: skip


def shippable_venv(env: Path, *, overlay: str | None = "addsitedir") -> Path:
    """A venv with ``marker`` installed by pip (about a second)."""
    make_venv(env, overlay=overlay)
    install_marker(env, marker_wheel(env.parent))
    return env


def rewrite_archive(archive: Path, out: Path, **manifest_changes: object) -> Path:
    """A copy of ``archive`` whose manifest has ``manifest_changes`` (a doctored env)."""
    import json

    name = "env/trioscheduler-env.json"
    with tarfile.open(archive, "r:gz") as src, tarfile.open(out, "w:gz", compresslevel=1) as dst:
        for ti in src.getmembers():
            f = src.extractfile(ti) if ti.isfile() else None
            if ti.name == name:
                assert f is not None
                data = json.loads(f.read())
                data.update(manifest_changes)
                raw = json.dumps(data).encode()
                ti.size = len(raw)
                dst.addfile(ti, io.BytesIO(raw))
            else:
                dst.addfile(ti, f)
    return out
