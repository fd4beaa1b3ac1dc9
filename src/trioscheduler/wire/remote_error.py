"""Exceptions that cross process boundaries with their remote traceback.

A task's exception is pickled on the worker into two blobs (exception, traceback) plus
texts for humans and logs. The scheduler forwards the blobs untouched. The client
rebuilds the exception with its original type and the remote frames as a real
traceback (``tblib``, as dask): ``traceback.print_tb``, ``pdb.post_mortem`` and IDEs
show where the task failed on the worker. The traceback blob is ``TBv1`` + msgpack of
the text and tblib's plain-data frames (never pickle); where frames cannot be rebuilt,
the text is attached as a note instead. An exception whose ``__init__`` cannot take back
its own ``args`` (keyword-only parameters) travels by state (``__new__``, ``args``,
``__dict__``) and keeps its type. One that cannot be pickled at all becomes a
``RemoteError`` carrying its type name and message, never a pickling failure.

``SystemExit``, ``KeyboardInterrupt`` and other ``BaseException``s that are not
``Exception``s travel as ``TaskExitError`` naming them: raised as themselves in the
client they would end the user's program, or look like the user pressed Ctrl-C.
"""

from __future__ import annotations

import pickle
import traceback as tb_module
from typing import Any

import cloudpickle
import msgpack

from trioscheduler.errors import TrioSchedulerError


class RemoteError(TrioSchedulerError):
    """Stands in for a remote exception whose type could not be pickled or unpickled."""

    def __init__(self, type_name: str, text: str) -> None:
        self.type_name = type_name
        self.text = text
        super().__init__(f"{type_name}: {text}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.type_name, self.text))


class TaskExitError(TrioSchedulerError):
    """A task raised ``SystemExit``, ``KeyboardInterrupt`` or another ``BaseException``
    that is not an ``Exception``; this names it instead of ending the client."""

    def __init__(self, type_name: str, text: str) -> None:
        self.type_name = type_name
        self.text = text
        super().__init__(
            f"the task raised {type_name}({text}); reported as this error so that it does not "
            "end (or interrupt) this program"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.type_name, self.text))


def _rebuild_exception(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    """An exception rebuilt without calling its ``__init__`` (see ``_ByState``)."""
    exc = cls.__new__(cls)
    exc.args = args
    if state:
        exc.__dict__.update(state)
    return exc


class _ByState:
    """Pickles an exception as class + args + ``__dict__``: for classes whose
    ``__init__`` does not accept their own ``args`` back (keyword-only parameters)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __reduce__(self) -> tuple[Any, ...]:
        exc = self.exc
        return (_rebuild_exception, (type(exc), exc.args, dict(getattr(exc, "__dict__", {}))))


def pack_exception(exc: BaseException) -> tuple[bytes, bytes, str, str]:
    """``(exception_blob, traceback_blob, exception_text, traceback_text)`` for ``exc``."""
    exc_text = f"{type(exc).__name__}: {exc}"
    tb_text = "".join(tb_module.format_exception(type(exc), exc, exc.__traceback__))
    if not isinstance(exc, Exception):  # SystemExit, KeyboardInterrupt, GeneratorExit...
        stand_in = TaskExitError(type(exc).__qualname__, ", ".join(map(repr, exc.args)))
        return pickle.dumps(stand_in, protocol=5), _pack_traceback(exc, tb_text), str(stand_in), tb_text
    for candidate in (exc, _ByState(exc)):
        try:
            blob = cloudpickle.dumps(candidate, protocol=5)
            pickle.loads(blob)  # an exception that pickles but cannot load is useless remotely
            return blob, _pack_traceback(exc, tb_text), exc_text, tb_text
        except Exception:
            continue
    blob = pickle.dumps(RemoteError(type(exc).__qualname__, str(exc)), protocol=5)
    return blob, _pack_traceback(exc, tb_text), exc_text, tb_text


_TB_MAGIC = b"TBv1"


def _pack_traceback(exc: BaseException, tb_text: str) -> bytes:
    frames = None
    if exc.__traceback__ is not None:
        try:
            from tblib import Traceback

            frames = Traceback(exc.__traceback__).as_dict()
        except Exception:  # a traceback tblib cannot read: the text still travels
            frames = None
    packed: bytes
    try:
        packed = msgpack.packb({"text": tb_text, "frames": frames}, use_bin_type=True)
    except (TypeError, ValueError):
        packed = msgpack.packb({"text": tb_text, "frames": None}, use_bin_type=True)
    return _TB_MAGIC + packed


def unpack_traceback(tb_blob: bytes) -> tuple[str, Any]:
    """``(text, traceback object or None)`` from a traceback blob."""
    if not tb_blob.startswith(_TB_MAGIC):
        return tb_blob.decode(errors="replace"), None
    try:
        data = msgpack.unpackb(tb_blob[len(_TB_MAGIC) :], raw=False, strict_map_key=False)
        text = str(data.get("text") or "")
        frames = data.get("frames")
    except Exception:
        return "", None
    tb = None
    if frames:
        try:
            from tblib import Traceback

            tb = Traceback.from_dict(frames).as_traceback()
        except Exception:
            tb = None
    return text, tb


def unpack_exception(exc_blob: bytes, tb_blob: bytes, exc_text: str = "") -> BaseException:
    """The remote exception, with the remote traceback attached as a note."""
    try:
        loaded = pickle.loads(exc_blob)
        if not isinstance(loaded, BaseException):
            raise TypeError(f"not an exception: {type(loaded).__name__}")
        exc = loaded
    except Exception as load_error:
        type_name, _, text = exc_text.partition(": ")
        exc = RemoteError(type_name or "Exception", text or f"unreadable remote exception ({load_error})")
    tb_text, tb = unpack_traceback(tb_blob) if tb_blob else ("", None)
    if tb is not None:
        return exc.with_traceback(tb)
    if tb_text:
        exc.add_note("\nRemote traceback (from the worker that ran the task):\n" + tb_text.rstrip())
    return exc
