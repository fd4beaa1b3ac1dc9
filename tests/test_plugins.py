"""Plugins on a real cluster: scheduler, worker and nanny plugins with dask's hooks, the
built-ins, and plugins that fail (the cluster keeps running, the client hears of it)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest

import trioscheduler
from trioscheduler import Client, LocalCluster
from trioscheduler.plugins import (
    CondaInstall,
    Environ,
    InstallPlugin,
    NannyPlugin,
    PipInstall,
    SchedulerPlugin,
    UploadDirectory,
    UploadFile,
    WorkerPlugin,
)


class Recorder(SchedulerPlugin):
    name = "recorder"

    def __init__(self, tag: str = "") -> None:
        self.tag = tag
        self.events: list[Any] = []

    async def start(self, scheduler: Any) -> None:
        self.events.append(("start",))

    def update_graph(self, scheduler: Any, *, keys: set[Any], **kwargs: Any) -> None:
        self.events.append(("update_graph", sorted(keys)))

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        self.events.append(("transition", key, start, finish))

    def add_worker(self, scheduler: Any, worker: str) -> None:
        self.events.append(("add_worker", worker))

    async def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        self.events.append(("remove_worker", worker))

    def add_client(self, scheduler: Any, client: str) -> None:
        self.events.append(("add_client", client))

    def remove_client(self, scheduler: Any, client: str) -> None:
        self.events.append(("remove_client", client))

    async def close(self) -> None:
        self.events.append(("close",))


def _events(name: str = "recorder", dask_scheduler: Any = None) -> Any:
    plugin = dask_scheduler.plugins.plugins.get(name)
    return None if plugin is None else (plugin.tag, plugin.events)


class Counter(WorkerPlugin):
    name = "counter"

    def setup(self, worker: Any) -> None:
        worker.plugin_setups = getattr(worker, "plugin_setups", 0) + 1
        worker.plugin_seen = []
        self.worker = worker

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        self.worker.plugin_seen.append((key, start, finish))

    def teardown(self, worker: Any) -> None:
        worker.plugin_torn_down = True


class SetupFails(WorkerPlugin):
    name = "setup-fails"

    def setup(self, worker: Any) -> None:
        raise ZeroDivisionError("setup of this plugin fails")


class TransitionFails(WorkerPlugin):
    name = "transition-fails"

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        raise KeyError("worker transition hook fails")


class SchedulerTransitionFails(SchedulerPlugin):
    name = "scheduler-transition-fails"

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        raise ValueError("scheduler transition hook fails")


class StartFails(SchedulerPlugin):
    async def start(self, scheduler: Any) -> None:
        raise LookupError("start of this plugin fails")


class NannyCounter(NannyPlugin):
    name = "nanny-counter"

    def setup(self, nanny: Any) -> None:
        nanny.plugin_setups = getattr(nanny, "plugin_setups", 0) + 1


def _inc(x: int) -> int:
    return x + 1


def _getenv(name: str) -> str | None:
    return os.environ.get(name)  # (os.environ.get itself would pickle the caller's environ)


def _worker_attr(name: str, dask_worker: Any = None) -> Any:
    return getattr(dask_worker, name, None)


@pytest.fixture(scope="module")
def cluster() -> Any:
    with LocalCluster(2, 1, memory_limit=0) as cluster:
        yield cluster


@pytest.fixture
def client(cluster: Any) -> Any:
    with Client(cluster) as client:
        yield client


def test_the_names_are_importable_from_the_package() -> None:
    for name in (
        "SchedulerPlugin", "WorkerPlugin", "NannyPlugin", "PipInstall", "InstallPlugin",
        "CondaInstall", "Environ", "UploadFile", "UploadDirectory",
    ):  # fmt: skip
        assert getattr(trioscheduler, name) is getattr(trioscheduler.plugins, name)


def test_scheduler_plugin_sees_dask_hooks_in_order(client: Client) -> None:
    client.register_plugin(Recorder())
    try:
        assert client.submit(_inc, 1, key="inc-1").result() == 2
        del_future = client.submit(_inc, 2, key="inc-2")
        del_future.result()
        del del_future
        with Client(client.scheduler_address) as other:
            other_id = other.id
        tag, events = client.run_on_scheduler(_events)
        assert events[0] == ("start",)
        assert ("update_graph", ["inc-1"]) in events
        steps = [e[2:] for e in events if e[0] == "transition" and e[1] == "inc-1"]
        assert steps[:3] == [("released", "queued"), ("queued", "processing"), ("processing", "memory")]
        # update_graph comes before the transitions it caused, as in dask
        assert events.index(("update_graph", ["inc-1"])) < events.index(
            ("transition", "inc-1", "released", "queued")
        )
        assert ("add_client", other_id) in events and ("remove_client", other_id) in events
    finally:
        client.unregister_scheduler_plugin("recorder")
    assert client.run_on_scheduler(_events) is None


def test_scheduler_plugin_is_replaced_by_name_unless_idempotent(client: Client) -> None:
    client.register_plugin(Recorder("first"))
    try:
        client.register_plugin(Recorder("second"), idempotent=True)
        assert client.run_on_scheduler(_events)[0] == "first"
        first_closed = client.run_on_scheduler(
            lambda dask_scheduler: dask_scheduler.plugins.plugins["recorder"]
        )
        client.register_plugin(Recorder("third"))
        assert client.run_on_scheduler(_events)[0] == "third"
        assert first_closed.events[-1] == ("close",)  # the replaced one was closed
    finally:
        client.unregister_scheduler_plugin("recorder")
    with pytest.raises(ValueError, match="recorder"):
        client.unregister_scheduler_plugin("recorder")


def test_add_and_remove_worker_hooks(cluster: Any, client: Client) -> None:
    client.register_plugin(Recorder())
    try:
        cluster.scale(3)
        client.wait_for_workers(3)
        cluster.scale(2)
        _, events = client.run_on_scheduler(_events)
        added = [e[1] for e in events if e[0] == "add_worker"]
        removed = [e[1] for e in events if e[0] == "remove_worker"]
        assert len(added) == 1 and removed == added  # the async remove_worker ran too
    finally:
        client.unregister_scheduler_plugin("recorder")


def test_worker_plugin_reaches_every_worker_now_later_and_after_restart(
    cluster: Any, client: Client
) -> None:
    replies = client.register_plugin(Counter())
    assert sorted(replies) == sorted(client.nthreads())
    assert set(client.run(_worker_attr, "plugin_setups").values()) == {1}
    assert client.submit(_inc, 10, key="counted").result() == 11
    seen = client.run(_worker_attr, "plugin_seen")
    assert any(("counted", "executing", "memory") in s for s in seen.values())
    # registering the same name again is idempotent on request ...
    client.register_plugin(Counter(), idempotent=True)
    assert set(client.run(_worker_attr, "plugin_setups").values()) == {1}
    # ... and otherwise a replacement: teardown, then setup again
    client.register_plugin(Counter())
    assert set(client.run(_worker_attr, "plugin_setups").values()) == {2}
    assert set(client.run(_worker_attr, "plugin_torn_down").values()) == {True}
    cluster.scale(3)  # a worker joining later gets it before any task
    client.wait_for_workers(3)
    assert sorted(client.run(_worker_attr, "plugin_setups").values()) == [1, 2, 2]
    client.restart()  # new processes: every worker sets it up once more
    assert set(client.run(_worker_attr, "plugin_setups").values()) == {1}
    client.unregister_worker_plugin("counter")
    assert set(client.run(_worker_attr, "plugin_torn_down").values()) == {True}
    cluster.scale(2)
    client.wait_for_workers(2)
    with pytest.raises(ValueError, match="counter"):
        client.unregister_worker_plugin("counter")


def _mark_worker(dask_worker: Any) -> None:
    dask_worker.marked_by_callback = True


def test_register_worker_callbacks_runs_setup_on_every_worker(client: Client) -> None:
    replies = client.register_worker_callbacks(_mark_worker)
    assert len(replies) == 2
    assert set(client.run(_worker_attr, "marked_by_callback").values()) == {True}
    with pytest.raises(TypeError, match="needs the setup function"):
        client.register_worker_callbacks()


def test_a_worker_plugin_whose_setup_raises(cluster: Any, client: Client) -> None:
    with pytest.raises(ZeroDivisionError, match="setup of this plugin fails") as info:
        client.register_plugin(SetupFails())
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "failed on 2 of 2 workers" in notes and "not kept" in notes
    # the workers are fine, and the plugin is not given to a worker joining later
    assert client.submit(_inc, 1, key="after-bad-setup").result() == 2
    cluster.scale(3)
    client.wait_for_workers(3)
    assert client.map(_inc, range(6), key=[f"later-{i}" for i in range(6)]) is not None
    assert len(client.nthreads()) == 3
    cluster.scale(2)


def test_a_scheduler_plugin_whose_start_raises(client: Client) -> None:
    with pytest.raises(LookupError, match="start of this plugin fails"):
        client.register_plugin(StartFails(), name="start-fails")
    assert client.run_on_scheduler(_events, "start-fails") is None
    assert client.submit(_inc, 5, key="after-bad-start").result() == 6


def test_hooks_that_raise_are_reported_to_the_registering_client(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trioscheduler.plugins")
    client.register_plugin(SchedulerTransitionFails())
    client.register_plugin(TransitionFails())
    try:
        futures = client.map(_inc, range(20), key=[f"hooked-{i}" for i in range(20)])
        assert client.gather(futures) == list(range(1, 21))
        client.run(lambda: None)  # a round trip after the workers' reports
        client.run_on_scheduler(lambda: None)
    finally:
        client.unregister_worker_plugin("transition-fails")
        client.unregister_scheduler_plugin("scheduler-transition-fails")
    reports = [r.getMessage() for r in caplog.records if r.getMessage().startswith("client ")]
    sched = [r for r in reports if "scheduler-transition-fails" in r]
    work = [r for r in reports if "'transition-fails'" in r]
    # once per plugin and hook, not once per transition
    assert len(sched) == 1 and "ValueError: scheduler transition hook fails" in sched[0]
    assert 1 <= len(work) <= 2 and "KeyError" in work[0] and "worker tcp://" in work[0]
    assert client.submit(_inc, 1, key="still-fine").result() == 2


def test_register_plugin_rejects_what_is_not_a_plugin(client: Client) -> None:
    with pytest.raises(TypeError, match="SchedulerPlugin, WorkerPlugin or NannyPlugin"):
        client.register_plugin(object())  # type: ignore[arg-type]


def test_nanny_plugins_environ_and_later_nannies(cluster: Any, client: Client) -> None:
    var = f"TS_PLUGIN_{uuid.uuid4().hex[:8]}"
    client.register_plugin(Environ({var: 42}))
    # the workers were restarted with it (and are back before register_plugin returned)
    assert set(client.run(_getenv, var).values()) == {"42"}
    assert client.submit(_getenv, var, key="env-in-task").result() == "42"
    client.register_plugin(NannyCounter())
    cluster.scale(3)  # a nanny starting later sets the plugins up before its worker
    client.wait_for_workers(3)
    assert set(client.run(_getenv, var).values()) == {"42"}
    assert sorted(getattr(n, "plugin_setups", 0) for n in cluster.workers.values()) == [1, 1, 1]
    client.unregister_worker_plugin("nanny-counter", nanny=True)
    cluster.scale(2)


def test_upload_file_and_upload_directory(client: Client, tmp_path: Path) -> None:
    mod = f"ts_uploaded_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{mod}.py").write_text("VALUE = 'from a file'\n")
    client.register_plugin(UploadFile(str(tmp_path / f"{mod}.py")))
    assert client.submit(lambda: __import__(mod).VALUE, key="uploaded").result() == "from a file"

    pkg_dir = tmp_path / f"project_{uuid.uuid4().hex[:8]}"
    (pkg_dir / "tests").mkdir(parents=True)
    inner = f"ts_dirmod_{uuid.uuid4().hex[:8]}"
    (pkg_dir / f"{inner}.py").write_text("VALUE = 'from a directory'\n")
    (pkg_dir / "tests" / "skipped.py").write_text("")
    plugin = UploadDirectory(str(pkg_dir), update_path=True, restart_workers=True)
    with zipfile.ZipFile(__import__("io").BytesIO(plugin.data)) as z:
        assert sorted(z.namelist()) == [f"{pkg_dir.name}/{inner}.py"]  # tests/ stays behind
    try:
        client.register_plugin(plugin)
        got = client.submit(lambda: __import__(inner).VALUE, key="from-dir").result()
        assert got == "from a directory"
    finally:
        sys.path[:] = [p for p in sys.path if pkg_dir.name not in p]
    with pytest.raises(ValueError, match="mode="):
        UploadDirectory(str(pkg_dir), mode="everywhere")


def _build_wheel(directory: Path, name: str) -> Path:
    """A minimal pure-Python wheel, written by hand (no network, no build backend)."""
    version = "1.0"
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": "ANSWER = 42\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in files) + f"{dist_info}/RECORD,,\n"
    files[f"{dist_info}/RECORD"] = record
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


@pytest.mark.parametrize("restart_workers", [False, True])
def test_pip_install_a_local_wheel_offline(
    client: Client, tmp_path: Path, restart_workers: bool
) -> None:
    name = f"ts_wheel_{uuid.uuid4().hex[:8]}"
    wheel = _build_wheel(tmp_path, name)

    def answer() -> int:
        return int(__import__(name).ANSWER)

    plugin = PipInstall([str(wheel)], pip_options=["--no-index", "--no-deps"],
                        restart_workers=restart_workers)  # fmt: skip
    assert isinstance(plugin, InstallPlugin)
    try:
        client.register_plugin(plugin)
        assert set(client.run(answer).values()) == {42}
        assert client.submit(answer, key=f"wheel-{restart_workers}").result() == 42
    finally:
        subprocess.run(
            [sys.executable, "-m", "pip", "uninstall", "-y", name], check=False, capture_output=True
        )
        client.unregister_scheduler_plugin(plugin.name)


def test_pip_install_that_fails_raises_and_leaves_the_cluster_running(
    client: Client, tmp_path: Path
) -> None:
    missing = tmp_path / "no_such_package-1.0-py3-none-any.whl"
    with pytest.raises(RuntimeError, match="pip install failed"):
        client.register_plugin(PipInstall([str(missing)], pip_options=["--no-index"]))
    assert client.submit(_inc, 1, key="after-pip-failure").result() == 2
    with pytest.raises(TypeError, match="list of requirements"):
        PipInstall("numpy")  # type: ignore[arg-type]


def test_conda_install_without_conda_says_so(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # the scheduler runs in this process
    with pytest.raises(RuntimeError, match="conda could not be found"):
        client.register_plugin(CondaInstall(["numpy"]))
    assert client.submit(_inc, 1, key="after-conda").result() == 2


def test_plugins_on_an_in_process_cluster() -> None:
    """Without processes: worker plugins on in-process workers; no nannies to reach."""
    with LocalCluster(1, 1, processes=False) as cluster, Client(cluster) as client:
        assert len(client.register_plugin(Counter())) == 1
        assert client.submit(_inc, 1, key="inproc").result() == 2
        (seen,) = client.run(_worker_attr, "plugin_seen").values()
        assert ("inproc", "executing", "memory") in seen
        assert client.register_plugin(NannyCounter()) == {}
