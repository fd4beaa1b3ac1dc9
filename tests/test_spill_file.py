"""Spill files: large values written and read with O_DIRECT come back byte-identical,
whatever the alignment of their buffers; where O_DIRECT is refused (tmpfs), buffered."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

from trioscheduler.server import spill_file
from trioscheduler.server.memory import DataStore

MiB = 1 << 20


def _values() -> dict[str, Any]:
    rng = np.random.default_rng(7)
    big = rng.random(3 * MiB // 8)
    u8 = np.frombuffer(os.urandom(5 * MiB + 3), dtype=np.uint8)
    frozen = rng.random(MiB // 4)
    frozen.flags.writeable = False
    return {
        "f64": big,
        "f64-offset": big[1:],  # its buffer starts 8 bytes into a page
        "u8-odd": u8[5:],  # odd address and odd length
        "read-only": frozen,
        "fortran": np.asfortranarray(rng.random((700, 300))),
        "bytes": os.urandom(2 * MiB + 11),
        "bytearray": bytearray(os.urandom(MiB + 5)),
        "several": {"a": big[3:], "b": u8[1:-1], "small": np.arange(10), "text": "x" * 1000},
        "small": np.arange(1000),
    }


def _same(back: Any, value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return (
            back.dtype == value.dtype
            and back.shape == value.shape
            and back.tobytes(order="A") == value.tobytes(order="A")
            and np.isfortran(back) == np.isfortran(value)
        )
    if isinstance(value, dict):
        return back.keys() == value.keys() and all(_same(back[k], value[k]) for k in value)
    return type(back) is type(value) and back == value


def _roundtrip(directory: str, read_buffered: bool = False) -> None:
    for name, value in _values().items():
        path = os.path.join(directory, name)
        kind, frames = spill_file.serialize(value)
        size = spill_file.write_frames(path, kind, frames)
        assert size == os.path.getsize(path)
        if read_buffered:
            spill_file._no_direct.add(directory)
        back = spill_file.read_value(path)
        spill_file._no_direct.discard(directory)
        assert _same(back, value), name
        if isinstance(back, np.ndarray) and back.nbytes >= MiB and value.flags.writeable:
            # an array read back is writable memory of its own (the file can go)
            os.remove(path)
            back[...] = 0
            assert not back.any()
        elif isinstance(back, np.ndarray):
            assert back.flags.writeable == value.flags.writeable


@pytest.mark.parametrize("mode", ["direct", "read-buffered", "buffered"])
def test_values_round_trip_with_any_alignment(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Direct writes and reads; a direct file read buffered (mapped); and everything
    buffered, as where O_DIRECT is refused."""
    if mode == "buffered":
        monkeypatch.setattr(spill_file, "_O_DIRECT", 0)
    _roundtrip(str(tmp_path), read_buffered=mode == "read-buffered")
    assert str(tmp_path) not in spill_file._no_direct


def test_store_spills_large_arrays_and_leaves_no_file(tmp_path: Any) -> None:
    store = DataStore(str(tmp_path))
    values = {i: np.random.default_rng(i).random(MiB // 8 * (i + 1))[i:] for i in range(4)}
    for key, value in values.items():
        store.put(key, value)
        assert store.spill(key)
    assert not store.memory and len(os.listdir(store.directory)) == 4
    assert store.spilled_bytes == sum(
        os.path.getsize(os.path.join(store.directory, f)) for f in os.listdir(store.directory)
    )
    for key, value in values.items():
        assert np.array_equal(store.unspill(key), value)
        store.delete(key)
    assert os.listdir(store.directory) == []
    store.close()
    assert not os.path.exists(store.directory)
