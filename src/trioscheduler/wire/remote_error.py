"""Exceptions that cross process boundaries with their remote traceback.

A task's exception is pickled on the worker into two blobs (exception, traceback) plus
texts for humans and logs. The scheduler forwards the blobs untouched. The client
rebuilds the exception with its original type; the remote traceback travels as text
(frames cannot be pickled) and is attached as a note, so ``result()`` shows where the
task failed on the worker. An exception whose ``__init__`` cannot take back its own
``args`` (keyword-only parameters) travels by state (``__new__``, ``args``,
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
        return pickle.dumps(stand_in, protocol=5), tb_text.encode(), str(stand_in), tb_text
    for candidate in (exc, _ByState(exc)):
        try:
            blob = cloudpickle.dumps(candidate, protocol=5)
            pickle.loads(blob)  # an exception that pickles but cannot load is useless remotely
            return blob, tb_text.encode(), exc_text, tb_text
        except Exception:
            continue
    blob = pickle.dumps(RemoteError(type(exc).__qualname__, str(exc)), protocol=5)
    return blob, tb_text.encode(), exc_text, tb_text


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
    tb_text = tb_blob.decode(errors="replace") if tb_blob else ""
    if tb_text:
        exc.add_note("\nRemote traceback (from the worker that ran the task):\n" + tb_text.rstrip())
    return exc
