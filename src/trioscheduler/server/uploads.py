"""``upload_file``: Python sources and archives made importable on every worker.

The scheduler keeps each uploaded file (``UploadStore``) and installs it on every
worker, now and on every worker that joins later (a new worker, or one a nanny
restarted): the scheduler installs the files on a joining worker *before* it hands the
worker's ``AddWorker`` to its core, so no task can reach a worker that lacks them.

Installing is an ordinary ``run`` request on the worker's data server, calling
``install`` below with ``dask_worker=``; a file that fails to import (a syntax error)
fails that request, and the worker keeps running. Only files that installed on every
worker are kept for later workers.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import shutil
import sys
import tempfile
import zipfile
import zipimport
from pathlib import Path
from typing import Any

import cloudpickle

__all__ = ["SUFFIXES", "UploadStore", "install", "read_upload"]

logger = logging.getLogger("trioscheduler.upload")

SUFFIXES = (".py", ".zip", ".egg")


def read_upload(path: str | os.PathLike[str]) -> tuple[str, bytes]:
    """``(file name, bytes)`` of a file the user wants on the workers (client side)."""
    p = Path(path)
    if p.suffix not in SUFFIXES:
        raise ValueError(
            f"upload_file({str(path)!r}): only {', '.join(SUFFIXES)} files can be uploaded"
        )
    return p.name, p.read_bytes()


def install_payload(filename: str, data: bytes, load: bool = True) -> bytes:
    """The ``run`` request body that installs one file on a worker."""
    payload: bytes = cloudpickle.dumps((install, (filename, data), {"load": load}), protocol=5)
    return payload


_process_directory: Path | None = None


def upload_directory(worker: Any) -> Path:
    """Where a worker keeps uploaded files: in its ``local_directory``, else in a
    temporary directory shared by the workers of this process and removed at exit."""
    global _process_directory
    local = getattr(worker, "local_directory", None)
    if local:
        directory = Path(local) / "uploads"
        directory.mkdir(parents=True, exist_ok=True)
        return directory
    if _process_directory is None or not _process_directory.exists():
        _process_directory = Path(tempfile.mkdtemp(prefix="trioscheduler-uploads-"))
        atexit.register(shutil.rmtree, _process_directory, ignore_errors=True)
    return _process_directory


def install(
    filename: str, data: bytes, dask_worker: Any = None, load: bool = True
) -> list[str]:
    """Write ``filename`` on this worker and (re)import what it holds; the module names.

    A ``.py`` file becomes an importable module (reloaded if it was imported before); a
    ``.zip``/``.egg`` archive goes on ``sys.path`` and its top-level modules and
    packages are (re)imported. Import errors propagate to the caller. With ``load=False``
    (dask's ``upload_file(load=False)``) nothing is imported now: the file is in place
    and modules it held before are forgotten, so the next ``import`` reads the new file.
    """
    directory = upload_directory(dask_worker)
    target = directory / filename
    target.write_bytes(data)
    if target.suffix == ".py":
        entry, names = str(directory), [target.stem]
    else:
        entry, names = str(target), _archive_modules(target)
        sys.path_importer_cache.pop(entry, None)
        zipimport._zip_directory_cache.pop(entry, None)  # type: ignore[attr-defined]
    if entry not in sys.path:
        sys.path.insert(0, entry)
    importlib.invalidate_caches()
    for name in names:
        for loaded in [n for n in sys.modules if n == name or n.startswith(name + ".")]:
            del sys.modules[loaded]  # import afresh: the file may have changed
        if load:
            importlib.import_module(name)
    return names


def _archive_modules(path: Path) -> list[str]:
    """Top-level modules and packages inside a zip or egg archive."""
    names: dict[str, None] = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            parts = member.split("/")
            top = parts[0]
            if top.endswith((".egg-info", ".dist-info")) or top in ("EGG-INFO", "__pycache__"):
                continue
            if len(parts) == 1 and top.endswith(".py"):
                names[top[:-3]] = None
            elif len(parts) == 2 and parts[1] == "__init__.py":
                names[top] = None
    return list(names)


class UploadStore:
    """The scheduler's uploaded files, in upload order (a later upload replaces one)."""

    __slots__ = ("files",)

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, bool]] = {}  # name -> (data, load)

    def keep(self, filename: str, data: bytes, load: bool = True) -> None:
        self.files.pop(filename, None)
        self.files[filename] = (data, load)

    def payloads(self) -> list[tuple[str, bytes]]:
        """``(file name, run request body)`` for a joining worker, oldest first."""
        return [(name, install_payload(name, *kept)) for name, kept in self.files.items()]
