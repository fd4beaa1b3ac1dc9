from __future__ import annotations

import threading
import traceback

from trioscheduler.wire.remote_error import RemoteError, pack_exception, unpack_exception


def _fail() -> None:
    raise ZeroDivisionError("deep inside the task")


def test_type_message_and_remote_traceback_survive() -> None:
    try:
        _fail()
    except ZeroDivisionError as e:
        blobs = pack_exception(e)
    exc = unpack_exception(blobs[0], blobs[1], blobs[2])
    assert type(exc) is ZeroDivisionError
    assert str(exc) == "deep inside the task"
    # the remote frames come back as a real traceback (tblib), not as text
    assert "_fail" in [fr.name for fr in traceback.extract_tb(exc.__traceback__)]
    assert blobs[2] == "ZeroDivisionError: deep inside the task"


class Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def test_unpicklable_exception_becomes_remote_error_with_its_name() -> None:
    exc_blob, tb_blob, text, _ = pack_exception(Unpicklable())
    exc = unpack_exception(exc_blob, tb_blob, text)
    assert isinstance(exc, RemoteError)
    assert "Unpicklable" in str(exc) and "holds a lock" in str(exc)


def test_corrupt_blob_falls_back_to_text() -> None:
    exc = unpack_exception(b"garbage", b"", "KeyError: 'x'")
    assert isinstance(exc, RemoteError) and exc.type_name == "KeyError"
