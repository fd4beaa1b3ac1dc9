"""The host cache over time, and other interpreters: eviction (least recently used,
bounded by count and size) that never removes an environment a process holds a lease
on, with real processes racing; ``Nanny(python=...)`` for the worker's interpreter and
the interpreter shipped venvs are re-based onto (the research notes' acceptance test 13,
with Debian's own /usr/bin/python3.11 as the other host's interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cloudpickle
import pytest
import trio

import envkit
from trioscheduler.client.client import Client
from trioscheduler.deploy.cluster import open_cluster
from trioscheduler.environments import IncompatibleEnvironmentError, archive, cache
from trioscheduler.environments.evict import Limits, evict
from trioscheduler.server.nanny import Nanny, WorkerStartError

cloudpickle.register_pickle_by_value(sys.modules[__name__])

DEBIAN_PYTHON = "/usr/bin/python3.11"
OTHER_VERSION = [
    p
    for p in ("/root/.pyenv/versions/3.12.1/bin/python3.12", "/usr/bin/python3.12")
    if os.access(p, os.X_OK)
]


def _packed(tmp_path: Path, name: str) -> tuple[Path, str]:
    env = envkit.make_venv(tmp_path / name, overlay=None)
    (envkit.site_packages(env) / f"{name}.py").write_text(f"NAME = {name!r}\n")
    out = tmp_path / f"{name}.tar.gz"
    return out, archive.pack(env, out)


def _entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


def _holder(root: Path, env_id: str) -> subprocess.Popen[str]:
    """Another process holding a lease on ``env_id`` until its stdin closes."""
    code = (
        "import sys; from pathlib import Path; from trioscheduler.environments import cache\n"
        "lease = cache.acquire(Path(sys.argv[1]), sys.argv[2])\n"
        "print('held' if lease else 'none', flush=True); sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(root), env_id],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_eviction_is_lru_and_spares_what_is_in_use(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    made = {name: _packed(tmp_path, name) for name in ("a", "b", "c")}
    ids = {name: env_id for name, (_, env_id) in made.items()}
    for path, env_id in made.values():
        cache.materialize(path, env_id, root)
    # Last use: a long ago, then b, then c (the mtime of .in-use; set, not slept for).
    for i, name in enumerate("abc"):
        os.utime(root / ids[name] / cache.IN_USE, (1_000_000 + i, 1_000_000 + i))
    sizes = {n: cache.read_ready(root / ids[n])["size"] for n in "abc"}  # type: ignore[index]
    assert all(s > 0 for s in sizes.values())

    holder = _holder(root, ids["a"])  # a worker runs in a: it is the newest use now
    os.utime(root / ids["a"] / cache.IN_USE, (1_000_000, 1_000_000))  # and still the oldest
    try:
        # Within both bounds: nothing goes.
        assert evict(root, Limits(3, sum(sizes.values()))) == []
        # One entry too many by count: the least recently used one that is free (b).
        assert evict(root, Limits(2, None)) == [ids["b"]]
        # By size, down to one entry's worth: c goes; a is held, and stays over the bound.
        assert evict(root, Limits(None, sizes["a"] - 1)) == [ids["c"]]
        assert _entries(root) == [ids["a"]]
        assert cache.acquire(root, ids["b"]) is None  # gone for good
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait()
    assert evict(root, Limits(None, sizes["a"] - 1)) == [ids["a"]]  # released: it can go
    assert _entries(root) == [] and not [p for p in root.iterdir() if p.is_dir()]
    # An evicted environment comes back as good as new.
    env = cache.materialize(*made["b"], root)
    done = subprocess.run([str(env / "bin" / "python"), "-c", "import b; print(b.NAME)"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.stdout.strip() == "b", done.stderr


def test_limits_come_from_arguments_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Limits.resolve() == Limits(10, 20 * 2**30)
    assert Limits.resolve(3, "2 GiB") == Limits(3, 2 * 2**30)
    assert Limits.resolve(0, None) == Limits(None, None)
    monkeypatch.setenv("TRIOSCHEDULER_ENV_CACHE_MAX_COUNT", "4")
    monkeypatch.setenv("TRIOSCHEDULER_ENV_CACHE_MAX_SIZE", "500MB")
    assert Limits.resolve() == Limits(4, 500_000_000)
    with pytest.raises(ValueError, match="a size such as"):
        Limits.resolve(2, "lots")
    with pytest.raises(ValueError, match="must not be negative"):
        Limits.resolve(-1)


_RACER = textwrap.dedent(
    """
    import sys
    import time
    from pathlib import Path
    from trioscheduler.environments import cache
    from trioscheduler.environments.evict import Limits, evict
    role, root, archive, env_id, rounds = sys.argv[1:6]
    root = Path(root)
    removed = 0
    if role == "evictor":  # until the users are done: all it can, every time
        while not (root.parent / "users-done").exists():
            if root.exists():
                removed += len(evict(root, Limits(None, 1)))
    for i in range(int(rounds)):
        lease = cache.materialize_leased(archive, env_id, root)
        env = lease.prefix
        # While leased, the environment is whole, at its place, and runs.
        assert (env / "pyvenv.cfg").is_file(), "pyvenv.cfg vanished under a lease"
        assert (env.parent / cache.READY).is_file(), ".ready vanished under a lease"
        assert (env / "lib").is_dir()
        lease.release()
        time.sleep(0.005)  # unleased for a moment: the evictors get their chance
    print("ok", removed, flush=True)
    """
)


def test_nannies_and_evictors_race_on_one_host(tmp_path: Path) -> None:
    """Real processes: two lease and re-extract in a loop while two evict everything they
    can in a loop; no lessee ever sees its environment go, nothing half-made stays."""
    root = tmp_path / "cache"
    path, env_id = _packed(tmp_path, "raced")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, role, str(root), str(path), env_id, rounds],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for role, rounds in [("user", "25"), ("user", "25"), ("evictor", "0"), ("evictor", "0")]
    ]
    outs = [p.communicate(timeout=300) for p in procs[:2]]
    (tmp_path / "users-done").touch()
    outs += [p.communicate(timeout=300) for p in procs[2:]]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outs
    assert sum(int(out.split()[1]) for out, _ in outs[2:]) > 0, outs  # they did race
    assert evict(root, Limits(None, 1)) in ([], [env_id])
    leftovers = [p.name for p in root.iterdir() if p.is_dir()]
    assert leftovers == [], leftovers


# -- other interpreters ------------------------------------------------------------------


def where() -> tuple[str, str, tuple[int, ...], str | None]:
    try:
        import marker  # type: ignore[import-not-found]

        version: str | None = marker.VERSION
    except ImportError:
        version = None
    return sys.prefix, sys.executable, tuple(sys.version_info[:3]), version


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return envkit.shippable_venv(tmp_path_factory.mktemp("build") / "venv")


def _venv_on(python: str, env: Path) -> Path:
    """A venv of interpreter ``python`` that sees the runner's packages (their compiled
    parts are for this X.Y, as is ``python``)."""
    subprocess.run([python, "-m", "venv", "--without-pip", str(env)], check=True)
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in envkit.runner_site_dirs())
    site = next((env / "lib").glob("python3*/site-packages"))
    (site / "zz_runner.pth").write_text(lines)
    return env


@pytest.mark.skipif(not os.access(DEBIAN_PYTHON, os.X_OK), reason=f"needs {DEBIAN_PYTHON}")
async def test_workers_run_under_another_interpreter_and_ship_onto_it(
    shipped: Path, tmp_path: Path
) -> None:
    """``python=`` a venv of Debian's 3.11.2 (the runner is pyenv's 3.11.x): the worker
    runs under it; a venv built by the runner's interpreter is re-based onto 3.11.2 and
    its workers run there (acceptance test 13 of the research notes)."""
    other = _venv_on(DEBIAN_PYTHON, tmp_path / "debian-venv")
    deb = subprocess.run(  # noqa: ASYNC221 - set-up, before the cluster
        [DEBIAN_PYTHON, "-c", "import sys; print(*sys.version_info[:3])"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    debian_real = os.path.realpath(DEBIAN_PYTHON)  # noqa: ASYNC240
    cache_root = tmp_path / "cache"
    with trio.fail_after(180):
        async with open_cluster(
            1, 1, memory_limit=0, python=str(other / "bin" / "python"),
            env_cache_dir=str(cache_root),
        ) as cluster:  # fmt: skip
            nanny = cluster.workers["0"]
            assert isinstance(nanny, Nanny) and nanny.started_by == "spawn"
            async with Client(cluster, asynchronous=True) as c:
                [(prefix, exe, version, marker)] = (await c.run(where)).values()
                assert prefix == str(other) and exe == str(other / "bin" / "python")
                assert [str(v) for v in version] == deb and marker is None

                await c.restart(environment=str(shipped))
                [(prefix, exe, version, marker)] = (await c.run(where)).values()
                [entry] = _entries(cache_root)
                assert prefix == str(cache_root / entry / "env")
                assert [str(v) for v in version] == deb and marker == envkit.MARKER_VERSION
                assert os.path.realpath(exe) == debian_real  # noqa: ASYNC240

                await c.restart(environment="base")
                [(prefix, *_)] = (await c.run(where)).values()
                assert prefix == str(other)


@pytest.mark.skipif(not os.access(DEBIAN_PYTHON, os.X_OK), reason=f"needs {DEBIAN_PYTHON}")
async def test_an_interpreter_without_trio_is_refused_at_start(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with open_cluster(0, 1, memory_limit=0) as cluster:
            with pytest.raises(WorkerStartError, match=r"python=.*lacks the module 'trio'"):
                async with Nanny(cluster.scheduler_address, python=DEBIAN_PYTHON, memory_limit=0):
                    pass
    with pytest.raises(ValueError, match="not an executable interpreter"):
        Nanny("tcp://127.0.0.1:1", python=str(tmp_path / "no-such-python"))


def test_one_environment_for_two_interpreters_gets_two_entries(
    shipped: Path, tmp_path: Path
) -> None:
    """A re-based venv points at one interpreter: another one gets its own entry."""
    if not os.access(DEBIAN_PYTHON, os.X_OK):
        pytest.skip(f"needs {DEBIAN_PYTHON}")
    out = tmp_path / "env.tar.gz"
    env_id = archive.pack(shipped, out)
    root = tmp_path / "cache"
    mine = cache.materialize(out, env_id, root)
    debian = cache.materialize(out, env_id, root, python=DEBIAN_PYTHON)
    assert mine == root / env_id / "env" and debian.parent.name.startswith(env_id + "-")
    assert cache.materialize(out, env_id, root, python=DEBIAN_PYTHON) == debian  # cached
    assert os.path.realpath(debian / "bin" / "python") == os.path.realpath(DEBIAN_PYTHON)
    assert os.path.realpath(mine / "bin" / "python") != os.path.realpath(DEBIAN_PYTHON)


@pytest.mark.skipif(not OTHER_VERSION, reason="needs a Python 3.12 besides this one")
def test_another_python_version_is_refused_naming_both(shipped: Path, tmp_path: Path) -> None:
    out = tmp_path / "env.tar.gz"
    env_id = archive.pack(shipped, out)
    with pytest.raises(IncompatibleEnvironmentError) as info:
        cache.materialize(out, env_id, tmp_path / "cache", python=OTHER_VERSION[0])
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert f"python: env '{here}' vs host '3.12'" in str(info.value)
    assert _entries(tmp_path / "cache") == []


def test_worker_command_python_needs_the_nanny() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "trioscheduler", "worker", "tcp://127.0.0.1:9", "--no-nanny",
         "--python", sys.executable],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0 and "--python needs the nanny" in done.stderr
