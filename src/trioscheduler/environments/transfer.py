"""Moving an archive in chunks over the cluster's own connections, checked by sha256.

Client -> scheduler: ``env_put`` requests, one chunk each, on the client's ordinary
request stream. Scheduler -> nanny: the nanny asks ``env_get`` (offset, length) on one
connection to the scheduler and hashes what arrives; a mismatch is an error and the
partial file is removed. Chunks are ``CHUNK`` bytes: big enough that the per-request cost
vanishes, small enough that neither side holds a whole environment in memory.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from trioscheduler import wire
from trioscheduler.environments.errors import EnvironmentArchiveError

CHUNK = 8 << 20

Rpc = Callable[[dict[str, Any]], Awaitable[Any]]


async def upload(rpc: Rpc, archive: Path, env_id: str) -> dict[str, Any]:
    """Send ``archive`` to the scheduler (unless it has it); returns its manifest."""
    manifest = await rpc({"op": "env_has", "id": env_id})
    if manifest is not None:
        return dict(manifest)
    size = (await trio.Path(archive).stat()).st_size
    offset = 0
    async with await trio.open_file(archive, "rb") as f:
        while True:
            data = await f.read(CHUNK)
            final = offset + len(data) >= size
            reply = await rpc(
                {"op": "env_put", "id": env_id, "offset": offset, "data": data, "final": final}
            )
            offset += len(data)
            if final:
                return dict(reply)
            if not data:
                raise EnvironmentArchiveError(f"{archive} shrank while it was being sent")


async def download(
    scheduler: str,
    env_id: str,
    directory: Path,
    *,
    role: str = "nanny",
    connect_args: dict[str, Any] | None = None,
) -> Path:
    """Fetch environment ``env_id`` from the scheduler into a new file in ``directory``."""
    fd, name = tempfile.mkstemp(prefix=f".{env_id[:16]}-", suffix=".tar.gz", dir=directory)
    path = Path(name)
    hasher = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            stream = await wire.connect(scheduler, timeout=30, role=role, **(connect_args or {}))
            async with stream:
                offset, size = 0, None
                while size is None or offset < size:
                    await stream.send(
                        {"op": "env_get", "id": env_id, "offset": offset, "length": CHUNK}
                    )
                    reply = await stream.receive()
                    if not isinstance(reply, dict) or reply.get("status") != "OK":
                        text = reply.get("text") if isinstance(reply, dict) else repr(reply)
                        raise EnvironmentArchiveError(
                            f"the scheduler could not send environment {env_id[:12]}: {text}"
                        )
                    data, size = reply["result"]
                    if not isinstance(data, bytes) or not isinstance(size, int):
                        raise EnvironmentArchiveError("the scheduler sent a malformed chunk")
                    if not data and offset < size:
                        raise EnvironmentArchiveError(
                            f"environment {env_id[:12]} ended at {offset} of {size} bytes"
                        )
                    hasher.update(data)
                    await trio.to_thread.run_sync(f.write, data)
                    offset += len(data)
        actual = hasher.hexdigest()
        if actual != env_id:
            raise EnvironmentArchiveError(
                f"environment {env_id[:12]} arrived with sha256 {actual}, not {env_id}: "
                "corrupted on the way or on the scheduler's disk"
            )
    except BaseException:
        path.unlink(missing_ok=True)  # noqa: ASYNC240 - must happen even when cancelled
        raise
    return path


def is_environment_id(environment: object) -> bool:
    """Is ``restart(environment=)`` an id or ``"base"`` (rather than a path to upload)?"""
    if environment == "base":
        return True
    return (
        isinstance(environment, str)
        and len(environment) == 64
        and all(c in "0123456789abcdef" for c in environment)
        and not os.path.exists(environment)
    )


async def upload_path(rpc: Rpc, path: str | os.PathLike[str]) -> str:
    """Pack (if needed) and upload a venv directory, archive or zip; returns its id."""
    from trioscheduler.environments.archive import for_upload

    packed, env_id, cleanup = await trio.to_thread.run_sync(for_upload, path)
    try:
        await upload(rpc, packed, env_id)
    finally:
        cleanup()
    return env_id
