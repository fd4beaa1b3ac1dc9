"""Exceptions that cross process boundaries with their remote traceback.

A task's exception is pickled on the worker into two blobs (exception, traceback) plus
texts for humans and logs. The scheduler forwards the blobs untouched. The client
rebuilds the exception with its original type; the remote traceback travels as text
(frames cannot be pickled) and is attached as a note, so ``result()`` shows where the
task failed on the worker. An exception that cannot be pickled becomes a
``RemoteError`` carrying its type name and message, never a pickling failure.
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


def pack_exception(exc: BaseException) -> tuple[bytes, bytes, str, str]:
    """``(exception_blob, traceback_blob, exception_text, traceback_text)`` for ``exc``."""
    exc_text = f"{type(exc).__name__}: {exc}"
    tb_text = "".join(tb_module.format_exception(type(exc), exc, exc.__traceback__))
    try:
        blob = cloudpickle.dumps(exc, protocol=5)
        pickle.loads(blob)  # an exception that pickles but cannot load is useless remotely
    except Exception:
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
