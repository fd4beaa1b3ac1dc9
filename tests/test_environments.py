"""Shipped environments without a cluster: pack-env, the host cache, rebase, safe
extraction, the preflight, the scheduler's store. Real venvs, real interpreters."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import envkit
from trioscheduler.environments import (
    IncompatibleEnvironmentError,
    UnsafeArchiveError,
    archive,
    cache,
)
from trioscheduler.environments.errors import EnvironmentArchiveError
from trioscheduler.environments.launch import prepare_launch
from trioscheduler.environments.store import EnvironmentStore


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One venv with ``marker`` installed by pip, for the whole module."""
    return envkit.shippable_venv(tmp_path_factory.mktemp("build") / "venv")


@pytest.fixture(scope="module")
def packed(shipped: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("packed") / "env.tar.gz"
    return out, archive.pack(shipped, out)


def _run(python: Path | str, code: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), "-P", "-c", code], capture_output=True, text=True, check=False, **kw
    )  # type: ignore[call-overload, no-any-return]


def test_pack_env_command_writes_a_shippable_archive(shipped: Path, tmp_path: Path) -> None:
    out = tmp_path / "env.tar.gz"
    done = subprocess.run(
        [sys.executable, "-m", "trioscheduler", "pack-env", str(shipped), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    env_id = archive.sha256_file(out)
    assert env_id in done.stdout
    with tarfile.open(out, "r:gz") as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile("env/trioscheduler-env.json").read())  # type: ignore[union-attr]
        owners = {(ti.uid, ti.gid) for ti in tar.getmembers()}
    # The builder's interpreter links stay behind; the host makes its own.
    assert not [n for n in names if n.startswith("env/bin/python")]
    assert "env/bin/marker-hello" in names and "env/pyvenv.cfg" in names
    assert owners == {(0, 0)}
    assert manifest["kind"] == "venv"
    assert manifest["python"] == f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert manifest["cache_tag"] == sys.implementation.cache_tag
    assert manifest["platform"] and manifest["libc"]
    assert "marker==1.0" in manifest["dists"]
    # The same directory packs to the same bytes: the same id, found in hosts' caches.
    assert archive.pack(shipped, tmp_path / "again.tar.gz") == env_id


def test_pack_env_refuses_what_cannot_travel(tmp_path: Path) -> None:
    system = envkit.make_venv(tmp_path / "system", overlay=None, system_site=True)
    done = subprocess.run(
        [sys.executable, "-m", "trioscheduler", "pack-env", str(system), "-o", str(tmp_path / "x.tar.gz")],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert done.returncode == 1
    assert "include-system-site-packages" in done.stderr
    assert not (tmp_path / "x.tar.gz").exists()
    (tmp_path / "plain").mkdir()
    with pytest.raises(EnvironmentArchiveError, match="neither a venv"):
        archive.pack(tmp_path / "plain", tmp_path / "y.tar.gz")
    linked = envkit.make_venv(tmp_path / "linked", overlay=None)
    (linked / "data").symlink_to("/etc/hostname")
    with pytest.raises(EnvironmentArchiveError, match="absolute path /etc/hostname"):
        archive.pack(linked, tmp_path / "z.tar.gz")


def test_materialize_rebases_a_venv_whose_interpreter_is_gone(
    shipped: Path, tmp_path: Path
) -> None:
    """The build host's interpreter is unknown here (``home = /nonexistent``) and the
    build path is gone: the venv runs from the cache, console scripts included."""
    build = tmp_path / "elsewhere" / "venv"
    shutil.copytree(shipped, build, symlinks=True)
    cfg = build / "pyvenv.cfg"
    cfg.write_text(
        "".join(
            "home = /nonexistent\n" if line.startswith("home") else line + "\n"
            for line in cfg.read_text().splitlines()
        )
    )
    env_id = archive.pack(build, tmp_path / "env.tar.gz")
    shutil.rmtree(tmp_path / "elsewhere")  # nothing of the build path remains

    env = cache.materialize(tmp_path / "env.tar.gz", env_id, tmp_path / "cache")
    assert env == tmp_path / "cache" / env_id / "env"
    done = _run(env / "bin" / "python", "import sys, marker; print(sys.prefix, marker.VERSION)")
    assert done.stdout.split() == [str(env), envkit.MARKER_VERSION], done.stderr
    hello = subprocess.run([str(env / "bin" / "marker-hello")], capture_output=True, text=True)
    assert hello.stdout.split() == ["marker", envkit.MARKER_VERSION, str(env)], hello.stderr
    assert "home = /nonexistent" not in (env / "pyvenv.cfg").read_text()


def test_cache_extracts_once(packed: tuple[Path, str], tmp_path: Path) -> None:
    path, env_id = packed
    root = tmp_path / "cache"
    env = cache.materialize(path, env_id, root)
    inode = (env / "pyvenv.cfg").stat().st_ino
    assert cache.materialize(path, env_id, root) == env
    assert (env / "pyvenv.cfg").stat().st_ino == inode  # not extracted again
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == [env_id]
    with pytest.raises(EnvironmentArchiveError, match="not the environment id"):
        cache.materialize(path, "0" * 64, root)
    with pytest.raises(EnvironmentArchiveError, match="not an environment id"):
        cache.materialize(path, "../../etc", root)


def test_nannies_of_one_host_materialize_at_once(packed: tuple[Path, str], tmp_path: Path) -> None:
    """Three processes ask for the same environment together: one directory, no leftovers."""
    path, env_id = packed
    root = tmp_path / "cache"
    code = (
        "import sys; from trioscheduler.environments import cache\n"
        "print(cache.materialize(sys.argv[1], sys.argv[2], sys.argv[3]))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(path), env_id, str(root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert {out.strip() for out, _ in outs} == {str(root / env_id / "env")}
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == [env_id]
    done = _run(root / env_id / "env" / "bin" / "python", "import marker")
    assert done.returncode == 0, done.stderr


def test_incompatible_environment_is_refused_naming_both_sides(
    packed: tuple[Path, str], tmp_path: Path
) -> None:
    bad = envkit.rewrite_archive(
        packed[0], tmp_path / "bad.tar.gz", python="3.99", cache_tag="cpython-399"
    )
    with pytest.raises(IncompatibleEnvironmentError) as info:
        cache.materialize(bad, archive.sha256_file(bad), tmp_path / "cache")
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert f"python: env '3.99' vs host '{here}'" in str(info.value)
    assert f"cache_tag: env 'cpython-399' vs host '{sys.implementation.cache_tag}'" in str(
        info.value
    )
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def _unsafe(tmp_path: Path, kind: str) -> Path:
    out = tmp_path / f"{kind}.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        ok = tarfile.TarInfo("env/ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        if kind in ("dotdot", "dotdot-inner"):
            ti = tarfile.TarInfo(
                "env/../../evil.txt" if kind == "dotdot" else "env/x/../../evil.txt"
            )
            ti.size = 4
            tar.addfile(ti, io.BytesIO(b"evil"))
            return out
        if kind == "abs-symlink":
            ti = tarfile.TarInfo("env/passwd")
            ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "symlink-out":
            ti = tarfile.TarInfo("env/lib/up")
            ti.type, ti.linkname = tarfile.SYMTYPE, "../../.."
        elif kind == "device":
            ti = tarfile.TarInfo("env/dev-null")
            ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
        elif kind == "hardlink-out":
            ti = tarfile.TarInfo("env/shadow")
            ti.type, ti.linkname = tarfile.LNKTYPE, "../../etc/shadow"
        elif kind == "link-chain":  # each link alone looks inside; together they escape
            hop = tarfile.TarInfo("env/a")
            hop.type, hop.linkname = tarfile.SYMTYPE, "."
            tar.addfile(hop)
            ti = tarfile.TarInfo("env/a/a/a/l")
            ti.type, ti.linkname = tarfile.SYMTYPE, "../../x"
        elif kind == "outside-env":
            ti = tarfile.TarInfo("other.txt")
            ti.size = 0
        tar.addfile(ti)
    return out


@pytest.mark.parametrize("path", ["with-data-filter", "without-data-filter"])
@pytest.mark.parametrize(
    "kind",
    [
        "dotdot",
        "dotdot-inner",
        "abs-symlink",
        "symlink-out",
        "link-chain",
        "device",
        "hardlink-out",
        "outside-env",
    ],
)
def test_unsafe_archives_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str, kind: str
) -> None:
    if path == "without-data-filter":  # Python 3.11.0-3.11.3: the same checks hold
        monkeypatch.delattr(tarfile, "data_filter")
    bad = _unsafe(tmp_path, kind)
    root = tmp_path / "deep" / "cache"
    with pytest.raises(UnsafeArchiveError):
        cache.materialize(bad, archive.sha256_file(bad), root)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "deep" / "evil.txt").exists()
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []


def test_extraction_keeps_what_an_environment_needs(tmp_path: Path) -> None:
    """Modes (less what the data filter drops), mtimes (the .pyc stay valid), links,
    a file bigger than one write, and the last of two members of one name."""
    from trioscheduler.environments.extract import INLINE, safe_extract

    big = os.urandom(INLINE * 3 + 17)
    out = tmp_path / "a.tar.gz"
    with tarfile.open(out, "w:gz") as tar:

        def add(name: str, data: bytes = b"", **attrs: object) -> None:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode = len(data), 1_600_000_000, 0o644
            for k, v in attrs.items():
                setattr(ti, k, v)
            tar.addfile(ti, io.BytesIO(data) if ti.isfile() else None)

        add("env", type=tarfile.DIRTYPE, mode=0o777)
        add("env/bin", type=tarfile.DIRTYPE, mode=0o755)
        add("env/bin/tool", b"#!/bin/sh\necho hi\n", mode=0o4775)
        add("env/data.txt", b"private", mode=0o400)
        add("env/big.bin", big)
        add("env/same.txt", b"first")
        add("env/same.txt", b"second")
        add("env/hard", type=tarfile.LNKTYPE, linkname="env/big.bin")
        add("env/bin/link", type=tarfile.SYMTYPE, linkname="tool")
    dest = tmp_path / "out"
    dest.mkdir()
    assert safe_extract(out, dest) == len(big) + 18 + 7 + 5 + 6
    env = dest / "env"
    assert (env / "bin" / "tool").stat().st_mode & 0o7777 == 0o755  # no setuid, no g+w
    assert (env / "data.txt").stat().st_mode & 0o777 == 0o600  # the owner may write
    assert env.stat().st_mode & 0o777 == 0o755
    assert (env / "big.bin").read_bytes() == big
    assert (env / "hard").stat().st_ino == (env / "big.bin").stat().st_ino
    assert (env / "same.txt").read_text() == "second"
    assert os.readlink(env / "bin" / "link") == "tool"
    assert {int((env / n).stat().st_mtime) for n in ("big.bin", "data.txt")} == {1_600_000_000}
    done = subprocess.run([str(env / "bin" / "link")], capture_output=True, text=True)
    assert done.stdout == "hi\n"


def test_fallback_extraction_keeps_a_real_venv_working(
    packed: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(tarfile, "data_filter")
    env = cache.materialize(packed[0], packed[1], tmp_path / "cache")
    done = _run(env / "bin" / "python", "import marker; print(marker.VERSION)")
    assert done.stdout.strip() == envkit.MARKER_VERSION, done.stderr


def test_preflight_uses_a_shim_or_names_what_is_missing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No trioscheduler but its dependencies: a shim, with a warning. No dependencies:
    the missing module is named. Another trioscheduler: the two versions are named."""
    root = tmp_path / "cache"

    def ready(env: Path) -> tuple[Path, str]:
        env_id = archive.pack(env, tmp_path / f"{env.name}.tar.gz")
        return cache.materialize(tmp_path / f"{env.name}.tar.gz", env_id, root), env_id

    env, env_id = ready(envkit.make_venv(tmp_path / "deps-only", overlay="plain"))
    with caplog.at_level(logging.WARNING, logger="trioscheduler.environments"):
        spec = prepare_launch(
            env_id, env, cwd=str(tmp_path), cache_root=root, base_env=dict(os.environ)
        )
    assert spec.shim is not None and "has no trioscheduler" in caplog.text
    done = subprocess.run(
        spec.argv(["--version"]), capture_output=True, text=True, env=spec.environ(os.environ)
    )
    assert done.returncode == 0 and "trioscheduler" in done.stdout, done.stderr

    env, env_id = ready(envkit.make_venv(tmp_path / "bare", overlay=None))
    with pytest.raises(IncompatibleEnvironmentError, match="lacks the module 'trio'"):
        prepare_launch(env_id, env, cwd=str(tmp_path), cache_root=root, base_env=dict(os.environ))

    other = envkit.make_venv(tmp_path / "other-version", overlay="plain")
    fake = envkit.site_packages(other) / "trioscheduler"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '0.0.0'\n")
    env, env_id = ready(other)
    with pytest.raises(
        IncompatibleEnvironmentError, match="has trioscheduler 0.0.0, the cluster runs"
    ):
        prepare_launch(env_id, env, cwd=str(tmp_path), cache_root=root, base_env=dict(os.environ))


def test_preflight_ignores_a_package_in_the_current_directory(
    packed: tuple[Path, str], tmp_path: Path
) -> None:
    """``-P``: a ``trioscheduler`` directory where the worker starts shadows nothing."""
    env = cache.materialize(packed[0], packed[1], tmp_path / "cache")
    (tmp_path / "cwd" / "trioscheduler").mkdir(parents=True)
    (tmp_path / "cwd" / "trioscheduler" / "__init__.py").write_text(
        "raise SystemExit('shadowed')\n"
    )
    spec = prepare_launch(
        packed[1],
        env,
        cwd=str(tmp_path / "cwd"),
        cache_root=tmp_path / "cache",
        base_env=dict(os.environ),
    )
    assert spec.shim is None


def test_store_checks_what_arrives(packed: tuple[Path, str]) -> None:
    path, env_id = packed
    data = path.read_bytes()
    store = EnvironmentStore()
    try:
        half = len(data) // 2
        store.put(env_id, 0, data[:half])
        corrupted = bytes([data[half] ^ 0xFF]) + data[half + 1 :]
        with pytest.raises(EnvironmentArchiveError, match="sha256"):
            store.put(env_id, half, corrupted, final=True)
        assert not store.has(env_id)
        store.put(env_id, 0, data[:half])
        with pytest.raises(EnvironmentArchiveError, match="expected"):
            store.put(env_id, half + 1, data[half + 1 :], final=True)  # a chunk went missing
        manifest = store.put(env_id, 0, data, final=True)
        assert manifest is not None and manifest["kind"] == "venv" and store.has(env_id)
        assert store.read(env_id, 0, 10) == (data[:10], len(data))
    finally:
        store.close()


def test_an_old_style_zip_is_accepted(shipped: Path, tmp_path: Path) -> None:
    """1.13's ``upload_environment(name, zipfile)``: a zip (exec bits lost) of the env."""
    zpath = tmp_path / "myenv.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(shipped.rglob("*")):
            rel = p.relative_to(shipped)
            if p.is_file() and not (rel.parts[0] == "bin" and rel.name.startswith("python")):
                zf.write(p, f"myenv/{rel}")
    packed_zip, env_id, cleanup = archive.for_upload(zpath)
    try:
        env = cache.materialize(packed_zip, env_id, tmp_path / "cache")
    finally:
        cleanup()
    hello = subprocess.run([str(env / "bin" / "marker-hello")], capture_output=True, text=True)
    assert hello.stdout.split() == ["marker", envkit.MARKER_VERSION, str(env)], hello.stderr


def test_a_prefix_environment_runs_as_it_is(tmp_path: Path) -> None:
    """A conda-pack style prefix (its own ``bin/python``, no ``pyvenv.cfg``): not
    re-based; its ``bin/conda-unpack`` runs once, in place, before it counts as ready;
    the worker's interpreter is the prefix's own ``bin/python``."""
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    python = prefix / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexport FROM_PREFIX=yes\nexec {sys.executable} "$@"\n')
    unpack = prefix / "bin" / "conda-unpack"
    unpack.write_text('#!/bin/sh\necho fixed > "$(dirname "$0")/../unpacked-here"\n')
    for script in (python, unpack):
        script.chmod(0o755)
    env_id = archive.pack(prefix, tmp_path / "prefix.tar.gz")
    assert archive.read_manifest(tmp_path / "prefix.tar.gz")["kind"] == "prefix"

    root = tmp_path / "cache"
    env = cache.materialize(tmp_path / "prefix.tar.gz", env_id, root)
    assert (env / "unpacked-here").read_text() == "fixed\n"  # ran where it now lies
    assert (env / "bin" / "python").read_text() == python.read_text()  # not re-based
    spec = prepare_launch(
        env_id, env, cwd=str(tmp_path), cache_root=root, base_env=dict(os.environ)
    )
    done = subprocess.run(
        spec.argv(["--version"]), capture_output=True, text=True, env=spec.environ(os.environ)
    )
    assert done.returncode == 0 and "trioscheduler" in done.stdout, done.stderr
    probe = subprocess.run(
        [spec.python, "-c", "import os; print(os.environ['FROM_PREFIX'])"],
        capture_output=True,
        text=True,
        env=spec.environ(os.environ),
    )
    assert probe.stdout.strip() == "yes"
    # Another platform's prefix is refused on this host.
    other = envkit.rewrite_archive(
        tmp_path / "prefix.tar.gz", tmp_path / "arm.tar.gz", platform="linux-aarch64"
    )
    with pytest.raises(IncompatibleEnvironmentError, match="platform: env 'linux-aarch64'"):
        cache.materialize(other, archive.sha256_file(other), root)
