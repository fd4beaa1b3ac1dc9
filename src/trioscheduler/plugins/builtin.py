"""The ready-made plugins of dask: install packages, set environment variables, ship
files and directories to the workers.

``InstallPlugin`` (and ``PipInstall``/``CondaInstall``) is a scheduler plugin, as in
dask: at registration it installs on the scheduler, then registers a worker plugin
that installs on every worker (or, with ``restart_workers=True``, a nanny plugin that
installs in the nanny and restarts its worker, so the new process imports what was
installed). Installs on one machine take turns (a file lock), so several workers of
one host never run pip or conda into the same environment at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import inspect
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import cloudpickle
import trio

from trioscheduler.plugins.base import NannyPlugin, SchedulerPlugin, WorkerPlugin
from trioscheduler.server import uploads

__all__ = [
    "CondaInstall",
    "Environ",
    "InstallPlugin",
    "PipInstall",
    "UploadDirectory",
    "UploadFile",
    "WorkerSetup",
]

logger = logging.getLogger("trioscheduler.plugins")


@contextlib.contextmanager
def _one_install_per_host() -> Iterator[None]:
    path = os.path.join(tempfile.gettempdir(), "trioscheduler-install.lock")
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _install_locked(install_fn: Callable[[], None]) -> None:
    with _one_install_per_host():
        install_fn()


def _raise_first_error(what: str, replies: dict[str, dict[str, Any]]) -> None:
    from trioscheduler.wire.remote_error import unpack_exception

    failed = {addr: r for addr, r in replies.items() if r.get("status") != "OK"}
    if not failed:
        return
    addr, first = sorted(failed.items())[0]
    if first.get("exception") is not None:
        exc: BaseException = unpack_exception(
            first["exception"], first.get("traceback") or b"", str(first.get("text"))
        )
    else:
        exc = RuntimeError(f"{what} failed on {addr}: {first.get('text')}")
    raise exc


class InstallPlugin(SchedulerPlugin):
    """Run ``install_fn`` (idempotent, no arguments) on the scheduler and every worker,
    also on workers that join later; ``restart_workers=True`` installs in the nannies
    and restarts their workers."""

    idempotent = True

    def __init__(self, install_fn: Callable[[], None], restart_workers: bool) -> None:
        self._install_fn = install_fn
        self.restart_workers = restart_workers
        self.name = f"{type(self).__name__}-{uuid.uuid4()}"
        self._scheduler: Any = None

    async def start(self, scheduler: Any) -> None:
        self._scheduler = scheduler
        await trio.to_thread.run_sync(_install_locked, self._install_fn)
        if self.restart_workers:
            blob = cloudpickle.dumps(_InstallNannyPlugin(self._install_fn, self.name))
            replies = await scheduler.plugins.add_nanny_plugin(blob, self.name, True, None)
        else:
            blob = cloudpickle.dumps(_InstallWorkerPlugin(self._install_fn, self.name))
            replies = await scheduler.plugins.add_worker_plugin(blob, self.name, True, None)
        _raise_first_error(f"{self.name}", replies)

    async def close(self) -> None:
        if self._scheduler is None:
            return
        if self.restart_workers:
            await self._scheduler.plugins.remove_nanny_plugin(self.name)
        else:
            await self._scheduler.plugins.remove_worker_plugin(self.name)


class _InstallNannyPlugin(NannyPlugin):
    restart = True

    def __init__(self, install_fn: Callable[[], None], name: str) -> None:
        self._install_fn = install_fn
        self.name = name

    async def setup(self, nanny: Any) -> None:
        await trio.to_thread.run_sync(_install_locked, self._install_fn)


class _InstallWorkerPlugin(WorkerPlugin):
    def __init__(self, install_fn: Callable[[], None], name: str) -> None:
        self._install_fn = install_fn
        self.name = name

    async def setup(self, worker: Any) -> None:
        await trio.to_thread.run_sync(_install_locked, self._install_fn)
        import importlib

        importlib.invalidate_caches()  # a package installed now is importable at once


class _PipInstaller:
    def __init__(self, packages: list[str], pip_options: list[str] | None = None) -> None:
        self.packages = list(packages)
        self.pip_options = list(pip_options or [])

    def __call__(self) -> None:
        logger.info("pip installing %s", self.packages)
        # A requirements file, as dask: lines may name environment variables.
        with tempfile.NamedTemporaryFile("w+", suffix=".txt") as f:
            f.write("\n".join(self.packages))
            f.flush()
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "install", *self.pip_options, "-r", f.name],
                capture_output=True,
                check=False,
            )
        if proc.returncode != 0:
            raise RuntimeError(f"pip install failed with '{proc.stderr.decode().strip()}'")


class PipInstall(InstallPlugin):
    """``pip install`` ``packages`` (requirement lines) with ``pip_options`` everywhere."""

    def __init__(
        self,
        packages: list[str],
        pip_options: list[str] | None = None,
        restart_workers: bool = False,
    ) -> None:
        if isinstance(packages, str):
            raise TypeError(f"PipInstall(packages=...) takes a list of requirements, not {packages!r}")
        super().__init__(_PipInstaller(packages, pip_options), restart_workers=restart_workers)


class _CondaInstaller:
    def __init__(self, packages: list[str], conda_options: list[str] | None = None) -> None:
        self.packages = list(packages)
        self.conda_options = list(conda_options or [])

    def __call__(self) -> None:
        conda = shutil.which("conda")
        if conda is None:
            raise RuntimeError(
                "conda install failed because conda could not be found: CondaInstall needs "
                "the 'conda' command on the scheduler's and the workers' PATH (use PipInstall "
                "in a virtualenv)"
            )
        logger.info("conda installing %s", self.packages)
        proc = subprocess.run(
            [conda, "install", "--yes", *self.conda_options, *self.packages],
            capture_output=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"conda install failed with '{proc.stderr.decode().strip()}'")


class CondaInstall(InstallPlugin):
    """``conda install`` ``packages`` with ``conda_options`` everywhere."""

    def __init__(
        self,
        packages: list[str],
        conda_options: list[str] | None = None,
        restart_workers: bool = False,
    ) -> None:
        super().__init__(_CondaInstaller(packages, conda_options), restart_workers=restart_workers)


class Environ(NannyPlugin):
    """Environment variables for the worker processes: set in each nanny, which then
    restarts its worker with them (later workers start with them)."""

    restart = True

    def __init__(self, environ: dict[str, Any] | None = None) -> None:
        self.environ = {str(k): str(v) for k, v in (environ or {}).items()}

    def setup(self, nanny: Any) -> None:
        # Our nanny's ``env`` is the whole environment of its workers (None: its own).
        base = os.environ if nanny.env is None else nanny.env
        nanny.env = {**base, **self.environ}


class WorkerSetup(WorkerPlugin):
    """``Client.register_worker_callbacks(setup)``: ``setup()`` (or
    ``setup(dask_worker=worker)``) on every worker, now and on later ones."""

    def __init__(self, setup: Callable[..., Any]) -> None:
        self.setup_function = setup
        self.name = f"{getattr(setup, '__name__', 'setup')}-{uuid.uuid4().hex[:8]}"

    def setup(self, worker: Any) -> Any:
        fn = self.setup_function
        try:
            takes_worker = "dask_worker" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            takes_worker = False
        return fn(dask_worker=worker) if takes_worker else fn()


class UploadFile(WorkerPlugin):
    """A ``.py``, ``.zip`` or ``.egg`` file made importable on every worker (as
    ``Client.upload_file``; ``load=True`` imports it at once)."""

    name = "upload_file"

    def __init__(self, filepath: str, load: bool = True) -> None:
        self.filename, self.data = uploads.read_upload(filepath)
        self.load = load

    def setup(self, worker: Any) -> None:
        uploads.install(self.filename, self.data, dask_worker=worker, load=self.load)


_UPLOAD_MODES = ("all", "scheduler", "workers")


def _skip_pyc(filename: str) -> bool:
    return os.path.splitext(filename)[1] == ".pyc"


class UploadDirectory(SchedulerPlugin):
    """A local directory copied to every nanny's machine (``mode="workers"``), the
    scheduler's (``"scheduler"``) or both (``"all"``); ``update_path=True`` puts it on
    ``sys.path`` there and ``restart_workers=True`` restarts the workers, which then
    import from it. Files under ``skip_words`` parts and those ``skip`` predicates
    match stay behind."""

    def __init__(
        self,
        path: str,
        restart_workers: bool = False,
        update_path: bool = False,
        skip_words: tuple[str, ...] = (".git", ".github", ".pytest_cache", "tests", "docs"),
        skip: tuple[Callable[[str], bool], ...] = (_skip_pyc,),
        mode: str = "workers",
    ) -> None:
        if mode not in _UPLOAD_MODES:
            raise ValueError(f"mode={mode!r} not supported, expected one of {list(_UPLOAD_MODES)}")
        path = os.path.expanduser(path)
        if not os.path.isdir(path):
            raise ValueError(f"UploadDirectory({path!r}): not a directory")
        path = os.path.abspath(path)
        self.path = os.path.basename(path)
        self.restart_workers = restart_workers
        self.update_path = update_path
        self.mode = mode
        self.name = "upload-directory-" + self.path
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
            for root, _, files in os.walk(path):
                for file in files:
                    filename = os.path.join(root, file)
                    if any(predicate(filename) for predicate in skip):
                        continue
                    if any(word in filename.split(os.sep) for word in skip_words):
                        continue
                    z.write(filename, os.path.relpath(filename, os.path.dirname(path)))
        self.data = buffer.getvalue()

    async def start(self, scheduler: Any) -> None:
        if self.mode in ("all", "scheduler"):
            _extract(getattr(scheduler, "local_directory", None), self.path, self.data, self.update_path)
        if self.mode in ("all", "workers"):
            plugin = _UploadDirectoryNannyPlugin(
                self.path, self.data, self.restart_workers, self.update_path, self.name
            )
            replies = await scheduler.plugins.add_nanny_plugin(
                cloudpickle.dumps(plugin), self.name, False, None
            )
            _raise_first_error(self.name, replies)


class _UploadDirectoryNannyPlugin(NannyPlugin):
    def __init__(self, path: str, data: bytes, restart: bool, update_path: bool, name: str) -> None:
        self.path = path
        self.data = data
        self.restart = restart
        self.update_path = update_path
        self.name = name

    def setup(self, nanny: Any) -> None:
        _extract(getattr(nanny, "local_directory", None), self.path, self.data, self.update_path)


def _extract(base: str | None, path: str, data: bytes, update_path: bool) -> str:
    """Unpack the directory's zip under ``base`` (a per-process temporary directory if
    None); with ``update_path`` its copy goes first on ``sys.path``. Its location."""
    if base is None:
        base = uploads.upload_directory(None).as_posix()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        z.extractall(path=base)
    target = os.path.join(base, path)
    if update_path and target not in sys.path:
        sys.path.insert(0, target)
    return target
