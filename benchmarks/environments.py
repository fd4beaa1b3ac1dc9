"""Environment workloads: how long ``client.restart(environment=...)`` takes.

dask.distributed has no equivalent to compare with: its ``upload_environment`` and
``restart(environment=)`` were removed in distributed 2.2.0 (2019, dask/distributed
#2877). So the reference column is our own ``restart(environment="base")`` on the same
cluster in the same run: a plain restart of the workers, what changing environment adds
to.

The environment is a realistic one made from this interpreter's installed packages: a
``python -m venv --without-pip`` plus copies of the files of trioscheduler's
dependencies, numpy, pandas, dask and pyarrow with everything they require (348 MB,
8,836 files here; ``--quick``: a small venv that borrows the runner's packages through a ``.pth``).
It is packed once per benchmark process with ``trioscheduler pack-env``'s code, not
timed (``pack-env`` prints its own time).

Each sample starts a fresh 2-worker ``LocalCluster`` (spawned workers) with an empty host
cache, then times, from the call to the first task's result in the new environment.
The host caches and the built environment are deleted when the benchmark process ends,
not between samples: on this machine's ext4 (no journal), creating files right after
thousands were deleted is several times slower (the inode allocator skips recently
deleted inodes one by one), which a host seeing an environment for the first time
does not pay.

* ``env-restart-cold``: ``restart(environment=archive)``: upload to the scheduler in
  chunks, both nannies fetch it and check its sha256, extract, re-base, preflight,
  restart. Target: under 5 s for a 200 MB environment on one host.
* ``env-restart-cached``: ``restart(environment=id)`` back into it after a restart into
  the base environment: the host's cache and the preflight are reused. Target: under 1 s.
"""

from __future__ import annotations

import atexit
import importlib.metadata as md
import os
import re
import shutil
import sys
import tempfile
import time
import venv
from pathlib import Path
from typing import Any

import cloudpickle

from benchmarks._harness import register

# The workers inside the environment cannot import this package: send our functions.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROOTS = ["trioscheduler", "numpy", "pandas", "dask", "pyarrow"]

_built: dict[bool, tuple[Path, Path, str]] = {}
_pending: dict[str, list[float]] = {
    "ours-cold": [],
    "ours-cached": [],
    "ref-cold": [],
    "ref-cached": [],
}
samples: list[dict[str, Any]] = []
_leftovers: list[str] = []


@atexit.register
def _remove_leftovers() -> None:
    for path in _leftovers:
        shutil.rmtree(path, ignore_errors=True)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(roots: list[str]) -> list[md.Distribution]:
    """The installed distributions ``roots`` need (extras left out)."""
    seen: dict[str, md.Distribution] = {}
    stack = list(roots)
    while stack:
        name = _norm(stack.pop())
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # a requirement for another platform or Python
        seen[name] = dist
        names = (
            re.match(r"[A-Za-z0-9_.\-]+", r) for r in dist.requires or [] if "extra ==" not in r
        )
        stack.extend(m.group(0) for m in names if m)
    return list(seen.values())


def _site_packages(env: Path) -> Path:
    return env / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def build_environment(directory: Path, quick: bool) -> Path:
    """A venv with real copies of the packages (or, quick, one borrowing the runner's)."""
    env = directory / "env"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env)
    sp = _site_packages(env)
    if quick:
        import sysconfig

        (sp / "zz_runner.pth").write_text(
            f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n"
        )
        return env
    for dist in _closure(ROOTS):
        for f in dist.files or []:
            if ".." in f.parts:
                continue  # console scripts outside site-packages
            source = Path(str(dist.locate_file(f)))
            if source.is_file():
                target = sp / f
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)  # mtimes kept: the .pyc stay valid
    return env


def _environment(quick: bool) -> tuple[Path, Path, str]:
    if quick not in _built:
        from trioscheduler.environments import archive

        directory = Path(tempfile.mkdtemp(prefix="trioscheduler-bench-env-"))
        _leftovers.append(str(directory))
        env = build_environment(directory, quick)
        t0 = time.perf_counter()
        env_id = archive.pack(env, directory / "env.tar.gz")
        size = sum(p.stat().st_size for p in env.rglob("*") if p.is_file() and not p.is_symlink())
        print(
            f"  environment: {size / 2**20:.0f} MB, {len(list(env.rglob('*')))} files; "
            f"packed to {(directory / 'env.tar.gz').stat().st_size / 2**20:.1f} MB in "
            f"{time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        _built[quick] = (env, directory / "env.tar.gz", env_id)
    return _built[quick]


def _prefix() -> str:
    return sys.prefix


def _timed(client: Any, **restart: Any) -> tuple[float, str]:
    t0 = time.perf_counter()
    client.restart(timeout=900, **restart)
    prefix = client.submit(_prefix, pure=False).result()
    return time.perf_counter() - t0, prefix


def scenario(quick: bool) -> dict[str, Any]:
    """One fresh cluster: cold restart into the environment, base, cached restart."""
    from trioscheduler import Client, LocalCluster

    _, archive_path, env_id = _environment(quick)
    cache = tempfile.mkdtemp(prefix="trioscheduler-bench-cache-")
    _leftovers.append(cache)
    with (
        LocalCluster(2, 1, memory_limit=0, start_method="spawn", env_cache_dir=cache) as cluster,
        Client(cluster) as client,
    ):
        client.submit(_prefix, pure=False).result()
        cold, prefix = _timed(client, environment=str(archive_path))
        assert prefix == os.path.join(cache, env_id, "env"), prefix
        base, prefix = _timed(client, environment="base")
        assert prefix == sys.base_prefix or not prefix.startswith(cache), prefix
        cached, prefix = _timed(client, environment=env_id)
        assert prefix.startswith(cache), prefix
        base2, _ = _timed(client, environment="base")
    sample = {"cold": cold, "cached": cached, "base": base, "base2": base2}
    samples.append(sample)
    return sample


def _side(side: str, row: str) -> Any:
    """``ours``/``ref`` of ``row``. A scenario gives all four numbers; whichever side
    asks first runs one, and the others read theirs from the same cluster."""

    def measure(quick: bool) -> float:
        mine = _pending[f"{side}-{row}"]
        if not mine:
            s = scenario(quick)
            for key, value in [("ours-cold", s["cold"]), ("ref-cold", s["base"]),
                               ("ours-cached", s["cached"]), ("ref-cached", s["base2"])]:  # fmt: skip
                _pending[key].append(value)
        return float(mine.pop(0))

    return measure


for row, text in [
    ("cold", "restart(environment=archive) to the first task inside it, empty host cache "
     "(upload, fetch, sha256, extract, re-base, preflight, spawn; s). Target < 5 s for 200 MB."),
    ("cached", "restart(environment=id) back into an environment the host has (s). "
     "Target < 1 s."),
]:  # fmt: skip
    register(
        f"env-restart-{row}",
        description=text,
        unit="s",
        higher_is_better=False,
        ours=_side("ours", row),
        reference=_side("ref", row),
        reference_label="none in dask (removed in 2.2.0, 2019); ours: restart(environment='base')",
    )
