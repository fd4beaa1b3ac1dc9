"""Moving an archive in chunks over the cluster's own connections, checked by sha256.

Client -> scheduler: ``env_put`` requests, one chunk each, on the client's ordinary
request stream. Scheduler -> nanny: the nanny asks ``env_get`` (offset, length) on one
connection to the scheduler, ``AHEAD`` requests in flight, and the chunks go straight
into the extraction (``ChunkReader``): nothing is written to disk but the environment,
and extracting overlaps the transfer. The sha256 of what arrived is checked at the end,
before the extracted tree can be used; a mismatch is an error and the tree is removed.
Chunks are ``CHUNK`` bytes: big enough that the per-request cost vanishes, small
enough that neither side holds a whole environment in memory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from trioscheduler import wire
from trioscheduler.environments.errors import EnvironmentArchiveError

CHUNK = 8 << 20
PREPARE_TIMEOUT = 600.0
"""Default budget of ``restart(environment=...)``'s first phase (upload, and every
nanny's fetch, extraction and preflight), apart from the restart's own ``timeout``."""

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


AHEAD = 2
"""Chunk requests a nanny keeps in flight: the scheduler reads the next while one travels."""

Chunk = bytes | BaseException  # an error ends the stream


async def fetch(
    scheduler: str,
    env_id: str,
    send: trio.MemorySendChannel[Chunk],
    *,
    role: str = "nanny",
    connect_args: dict[str, Any] | None = None,
) -> None:
    """Send the chunks of environment ``env_id`` from the scheduler into ``send``, in
    order, then close it; a failure is sent as its exception (never raised here). A
    closed receiving end (the reader gave up) ends the fetch quietly."""
    async with send:
        try:
            stream = await wire.connect(scheduler, timeout=30, role=role, **(connect_args or {}))
            async with stream:
                asked, offset, size = 0, 0, None
                while size is None or offset < size:
                    # One request until the size is known, then AHEAD, never past the end.
                    limit = CHUNK if size is None else min(size, offset + AHEAD * CHUNK)
                    while asked < limit:
                        await stream.send(
                            {"op": "env_get", "id": env_id, "offset": asked, "length": CHUNK}
                        )
                        asked += CHUNK
                    reply = await stream.receive()
                    if not isinstance(reply, dict) or reply.get("status") != "OK":
                        text = reply.get("text") if isinstance(reply, dict) else repr(reply)
                        raise EnvironmentArchiveError(
                            f"the scheduler could not send environment {env_id[:12]}: {text}"
                        )
                    data, size = reply["result"]
                    if not isinstance(data, bytes) or not isinstance(size, int):
                        raise EnvironmentArchiveError("the scheduler sent a malformed chunk")
                    if len(data) != min(CHUNK, size - offset):
                        raise EnvironmentArchiveError(
                            f"environment {env_id[:12]} ended at {offset + len(data)} of "
                            f"{size} bytes"
                        )
                    offset += len(data)
                    await send.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the reader stopped (its own error says why)
        except (OSError, trio.EndOfChannel, trio.TooSlowError, EnvironmentArchiveError) as exc:
            with trio.move_on_after(5):
                try:
                    await send.send(exc)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass


class ChunkReader:
    """A blocking, forward-only binary stream over chunks (for the extracting thread),
    hashing what passes; ``finish`` reads the rest and checks the sha256."""

    def __init__(self, next_chunk: Callable[[], Chunk], env_id: str) -> None:
        self._next = next_chunk  # b"" at the end
        self.env_id = env_id
        self._hasher = hashlib.sha256()
        self._buffer = memoryview(b"")
        self.size = 0
        self._eof = False

    def _fill(self) -> bool:
        if self._eof:
            return False
        chunk = self._next()
        if isinstance(chunk, BaseException):
            raise EnvironmentArchiveError(
                f"environment {self.env_id[:12]} could not be fetched: {chunk}"
            ) from chunk
        if not chunk:
            self._eof = True
            return False
        self._hasher.update(chunk)
        self.size += len(chunk)
        self._buffer = memoryview(chunk)
        return True

    def read(self, n: int = -1) -> bytes:
        if not self._buffer and not self._fill():
            return b""
        if n < 0 or n >= len(self._buffer):
            data, self._buffer = bytes(self._buffer), memoryview(b"")
        else:
            data, self._buffer = bytes(self._buffer[:n]), self._buffer[n:]
        return data

    def readable(self) -> bool:
        return True

    def finish(self) -> None:
        """Consume what the archive's reader left (tar's end padding); check the sha256."""
        self._buffer = memoryview(b"")
        while self._fill():
            self._buffer = memoryview(b"")
        actual = self._hasher.hexdigest()
        if actual != self.env_id:
            raise EnvironmentArchiveError(
                f"environment {self.env_id[:12]} arrived with sha256 {actual}, not "
                f"{self.env_id}: corrupted on the way or on the scheduler's disk"
            )


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
