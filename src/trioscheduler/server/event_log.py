"""The recorder's log on disk: append-only, framed, torn tails detected and dropped.

A file is an 8-byte magic, then frames. A frame is ``<length:u32><crc32:u32>`` and
``length`` bytes of concatenated msgpack records (``core.recorder``'s): the header, the
events of one ``handle()`` call (with its ``["batch", n]`` marker), or a record of the
shell's own state (``["shell", what, ...]``: published datasets). One frame is one
``write(2)``, made *before* the core handles the events, so the effects of an event never
leave the process before the event is in the kernel's hands.

What survives what (``docs/recovery.md``):

* the process killed (kill -9, OOM, a crash): nothing is lost that any peer was told;
  a frame cut short by the kill (a short write) is detected by its length or checksum,
  dropped, and the file truncated back to the last whole frame before appending again.
* the machine losing power: the frames written since the last ``fsync`` may be lost.
  ``fsync_interval`` (seconds, default 1.0) bounds that window: the shell calls
  ``fsync`` in a thread at most that often while there is something new; ``0`` syncs
  after every frame (slow: one disk flush per event batch); ``None`` leaves it to the
  kernel (about 30 s on Linux).

A damaged frame *before* the last one is not a torn tail: reading stops with an error
naming the offset rather than replaying a log with a hole in it.

Files written before this format (concatenated msgpack records, no magic) still load.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from trioscheduler.core import messages, recorder

__all__ = ["EventLogWriter", "LogContents", "LogError", "load_log", "read_log"]

MAGIC = b"TSCHLOG\x01"
SHELL_TAG = "shell"
_FRAME = struct.Struct("<II")


class LogError(ValueError):
    """A log file could not be read: not a log, or damaged before its last frame."""


@dataclass
class LogContents:
    """A log file's records: the core's (replayable) and the shell's, in order."""

    records: list[Any] = field(default_factory=list)  # header, batch markers, events
    shell: list[Any] = field(default_factory=list)  # ["shell", what, ...]
    frames: int = 0
    good_bytes: int = 0  # the end of the last whole frame
    torn_bytes: int = 0  # dropped from the tail (a write cut short)

    @property
    def header(self) -> list[Any] | None:
        r = self.records
        return r[0] if r and r[0] and r[0][0] == recorder.HEADER_TAG else None


def _unpack(payload: bytes) -> list[Any]:
    return recorder.unpack_log(payload)


def read_log(path: str | os.PathLike[str]) -> LogContents:
    """Every whole frame of ``path``; a torn last frame is counted in ``torn_bytes``."""
    data = Path(path).read_bytes()
    out = LogContents()
    if not data.startswith(MAGIC):
        if MAGIC.startswith(data):  # a file cut inside its magic: empty
            out.torn_bytes = len(data)
            return out
        try:
            out.records = _unpack(data)  # the older format: plain records, no frames
        except Exception as exc:
            raise LogError(f"{path} is not a trioscheduler event log: {exc!r:.200}") from None
        out.good_bytes = len(data)
        return out
    pos = len(MAGIC)
    end = len(data)
    while pos < end:
        if end - pos < _FRAME.size:
            break  # torn inside a frame head
        length, crc = _FRAME.unpack_from(data, pos)
        start = pos + _FRAME.size
        payload = data[start : start + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            if start + length < end:  # whole frames follow: damage, not a torn tail
                raise LogError(f"{path}: damaged frame at byte {pos} (checksum mismatch)")
            break
        for r in _unpack(payload):
            if r and r[0] == SHELL_TAG:
                out.shell.append(r)
            else:
                out.records.append(r)
        out.frames += 1
        pos = start + length
    out.good_bytes = pos
    out.torn_bytes = end - pos
    return out


def load_log(path: str | os.PathLike[str]) -> list[Any]:
    """The core's records of a log file, for ``core.recorder.replay`` (tools, tests)."""
    return read_log(path).records


def frame(records: Iterable[Any], packer: msgpack.Packer | None = None) -> bytes:
    """One frame holding ``records`` (already ``messages.dump``-ed)."""
    pack = (packer or msgpack.Packer(use_bin_type=True)).pack
    payload = b"".join([pack(r) for r in records])
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


class EventLogWriter:
    """Appends frames to a log file; ``fsync`` is the caller's to schedule (``due``).

    ``EventLogWriter.create(path, header)`` starts a new file (replacing any);
    ``EventLogWriter.append_to(path, contents)`` continues one just read, first cutting
    off its torn tail.
    """

    __slots__ = ("path", "fd", "fsync_interval", "dirty", "packer", "frames", "bytes", "_held")

    def __init__(self, path: Path, fd: int, fsync_interval: float | None) -> None:
        if fsync_interval is not None and fsync_interval < 0:
            raise ValueError(f"fsync_interval must be >= 0 seconds or None, not {fsync_interval!r}")
        self.path = path
        self.fd = fd
        self.fsync_interval = fsync_interval
        self.dirty = False
        self.packer = msgpack.Packer(use_bin_type=True)
        self.frames = 0
        self.bytes = 0
        self._held: list[bytes] | None = None  # frames kept for one write (``hold``)

    @classmethod
    def create(
        cls, path: str | os.PathLike[str], header: list[Any], fsync_interval: float | None
    ) -> EventLogWriter:
        path = Path(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        self = cls(path, fd, fsync_interval)
        self._write(MAGIC + frame([header], self.packer))
        self.sync()
        return self

    @classmethod
    def append_to(
        cls, path: str | os.PathLike[str], contents: LogContents, fsync_interval: float | None
    ) -> EventLogWriter:
        path = Path(path)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        if contents.torn_bytes:
            os.ftruncate(fd, contents.good_bytes)
        self = cls(path, fd, fsync_interval)
        if contents.good_bytes == 0:  # only a torn magic was there
            self._write(MAGIC)
        if contents.torn_bytes:
            self.sync()
        return self

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.bytes += len(data)

    def append(self, records: Iterable[Any]) -> None:
        """One frame: written to the kernel now (or at ``release``, while held); synced
        then too if ``fsync_interval == 0``."""
        data = frame(records, self.packer)
        self.frames += 1
        if self._held is not None:
            self._held.append(data)
            return
        self._write(data)
        if self.fsync_interval == 0:
            os.fsync(self.fd)
        else:
            self.dirty = True

    def hold(self) -> None:
        """Keep the next frames for one ``write`` at ``release``. The caller releases
        before anything those events caused can leave the process (the shell holds
        while it handles one batch read from a stream, with no schedule point between)."""
        if self._held is None:
            self._held = []

    def release(self) -> None:
        held, self._held = self._held, None
        if held:
            self._write(b"".join(held))
            if self.fsync_interval == 0:
                os.fsync(self.fd)
            else:
                self.dirty = True

    def record(self, events: tuple[Any, ...] | list[Any]) -> None:
        """The events of one ``handle()`` call, as the recorder logs them: one frame."""
        dump = messages.dump
        if len(events) == 1:
            self.append([dump(events[0])])
        else:  # replayed as one handle() call, as it was handled
            self.append([[recorder.BATCH_TAG, len(events)], *[dump(e) for e in events]])

    def sync(self) -> None:
        """``fsync`` (blocking: call it in a thread from a trio task)."""
        self.dirty = False
        os.fsync(self.fd)

    def close(self) -> None:
        self.release()
        if self.fd >= 0:
            try:
                os.fsync(self.fd)
            finally:
                os.close(self.fd)
                self.fd = -1
