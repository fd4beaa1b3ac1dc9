"""The scheduler's environments: uploaded archives, and the *current* environment.

An archive arrives in chunks (``put``), each appended at the offset the uploader names
and hashed on the way; the last chunk checks the sha256 against the id the uploader
claimed, reads the manifest (JSON, nothing unpickled) and only then renames the archive
into ``<directory>/<sha256>.tar.gz``. Nannies read it back in chunks (``read``).

``current`` is the environment every worker runs in: set by a successful
``restart(environment=...)``, and asked for by each nanny before it starts a worker, so
workers restarted after a crash and workers joining later start in it too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any

from trioscheduler.environments.archive import read_manifest
from trioscheduler.environments.cache import check_id
from trioscheduler.environments.errors import EnvironmentArchiveError

MAX_CHUNK = 64 << 20


class _Partial:
    __slots__ = ("file", "hasher", "path", "size")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: IO[bytes] = open(path, "wb")  # noqa: SIM115 - closed by finish/abort
        self.hasher = hashlib.sha256()
        self.size = 0


class EnvironmentStore:
    """Uploaded environment archives of one scheduler (in a temporary directory)."""

    def __init__(self) -> None:
        self.current: str | None = None
        self._directory: Path | None = None
        self._partial: dict[str, _Partial] = {}
        self.manifests: dict[str, dict[str, Any]] = {}

    @property
    def directory(self) -> Path:
        if self._directory is None:
            self._directory = Path(tempfile.mkdtemp(prefix="trioscheduler-scheduler-envs-"))
        return self._directory

    def path(self, env_id: str) -> Path:
        return self.directory / f"{check_id(env_id)}.tar.gz"

    def has(self, env_id: str) -> bool:
        return check_id(env_id) in self.manifests

    def put(
        self, env_id: str, offset: int, data: bytes, final: bool = False
    ) -> dict[str, Any] | None:
        """Append one chunk of ``env_id``; with ``final``, check and keep it (its manifest)."""
        check_id(env_id)
        if not isinstance(data, bytes) or len(data) > MAX_CHUNK:
            raise EnvironmentArchiveError(f"a chunk is bytes of at most {MAX_CHUNK} bytes")
        if self.has(env_id):
            return self.manifests[env_id] if final else None
        part = self._partial.get(env_id)
        if part is None:
            if offset != 0:
                raise EnvironmentArchiveError(
                    f"upload of environment {env_id[:12]} must start at offset 0, not {offset}"
                )
            part = self._partial[env_id] = _Partial(
                self.directory / f".{env_id}.partial-{len(self._partial)}"
            )
        elif offset != part.size:
            self.abort(env_id)
            raise EnvironmentArchiveError(
                f"upload of environment {env_id[:12]}: chunk at offset {offset}, expected "
                f"{part.size}; start again"
            )
        part.file.write(data)
        part.hasher.update(data)
        part.size += len(data)
        if not final:
            return None
        part.file.close()
        del self._partial[env_id]
        try:
            actual = part.hasher.hexdigest()
            if actual != env_id:
                raise EnvironmentArchiveError(
                    f"the environment arrived with sha256 {actual}, not {env_id}: "
                    "corrupted on the way, upload it again"
                )
            manifest = read_manifest(part.path)
            os.replace(part.path, self.path(env_id))
        finally:
            part.path.unlink(missing_ok=True)
        self.manifests[env_id] = manifest
        return manifest

    def abort(self, env_id: str) -> None:
        part = self._partial.pop(env_id, None)
        if part is not None:
            part.file.close()
            part.path.unlink(missing_ok=True)

    def read(self, env_id: str, offset: int, length: int) -> tuple[bytes, int]:
        """``(bytes at offset, total size)`` of a kept archive."""
        if not self.has(env_id):
            raise EnvironmentArchiveError(f"the scheduler has no environment {env_id}")
        length = max(0, min(int(length), MAX_CHUNK))
        path = self.path(env_id)
        with open(path, "rb") as f:
            f.seek(int(offset))
            return f.read(length), os.fstat(f.fileno()).st_size

    def close(self) -> None:
        for env_id in list(self._partial):
            self.abort(env_id)
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None
