"""memory_limit parsing and the data store: real spill files, byte-identical round trips."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from trioscheduler import TrioSchedulerWarning
from trioscheduler.server.memory import (
    DataStore,
    UnpicklableValue,
    incoming_bytes_limit,
    parse_memory_limit,
    system_memory,
    write_spills,
)


def test_parse_memory_limit() -> None:
    total = system_memory()
    assert parse_memory_limit(None) is None
    assert parse_memory_limit(0) is None
    assert parse_memory_limit("0") is None
    assert parse_memory_limit(2_000_000) == 2_000_000
    assert parse_memory_limit("2GiB") == 2 * 2**30
    assert parse_memory_limit("500MB") == 500_000_000
    assert parse_memory_limit("500 MiB") == 500 * 2**20
    assert parse_memory_limit(0.5) == int(0.5 * total)
    assert parse_memory_limit("0.25") == int(0.25 * total)
    assert parse_memory_limit(1.0) == total
    assert parse_memory_limit("auto") == total
    assert parse_memory_limit("auto", nworkers=4) == total // 4
    assert parse_memory_limit(total * 10) == total  # capped at the machine's memory
    with pytest.raises(ValueError, match="not understood"):
        parse_memory_limit("lots")
    with pytest.raises(ValueError, match="negative"):
        parse_memory_limit(-5)
    with pytest.raises(TypeError):
        parse_memory_limit([1])  # type: ignore[arg-type]


def test_incoming_bytes_limit() -> None:
    """A worker's transfer_incoming_bytes_limit: 10% of its memory limit by default."""
    assert incoming_bytes_limit("auto", 2_000_000) == 200_000
    assert incoming_bytes_limit("auto", None) is None  # no memory limit, no byte limit
    assert incoming_bytes_limit(None, 2_000_000) is None
    assert incoming_bytes_limit(5_000, None) == 5_000
    assert incoming_bytes_limit("1MiB", 2_000_000) == 2**20
    with pytest.raises(ValueError, match="transfer_incoming_bytes_limit"):
        incoming_bytes_limit(-1, None)


@pytest.fixture
def store(tmp_path: os.PathLike[str]) -> Iterator[DataStore]:
    s = DataStore(str(tmp_path))
    yield s
    s.close()


def test_spill_roundtrip_is_byte_identical(store: DataStore) -> None:
    rng = np.random.default_rng(42)
    values = {
        "f64": rng.standard_normal((300, 200)),
        "fortran": np.asfortranarray(rng.integers(0, 2**60, (50, 70), dtype=np.int64)),
        "strided": rng.standard_normal((100, 100))[::3, 1::2],
        "u8": np.frombuffer(os.urandom(1 << 20), dtype=np.uint8),
        "bytes": os.urandom(3 << 20),
        "bytearray": bytearray(os.urandom(1000)),
        "empty-bytes": b"",
        "empty-bytearray": bytearray(),
        "bytes-subclass": type("B", (bytes,), {})(b"sub"),  # not raw: pickled like any object
        ("tuple-key", 3): {"nested": [1, 2.5, "x", b"y", np.arange(10)]},
        "lambda": lambda x: x + 1,  # cloudpickle fallback
    }
    for k, v in values.items():
        store.put(k, v)
    for k in values:
        assert store.spill(k)
    assert not store.memory
    files = os.listdir(store.directory)
    assert len(files) == len(values)
    assert store.spilled_bytes == sum(
        os.path.getsize(os.path.join(store.directory, f)) for f in files
    )
    assert store.spilled_bytes > (3 << 20) + (1 << 20)

    # reading a spilled value does not unspill it
    peek = store["bytes"]
    assert peek == values["bytes"] and "bytes" in store.spilled

    for k, v in values.items():
        back = store.unspill(k)
        if isinstance(v, np.ndarray):
            assert back.dtype == v.dtype and back.shape == v.shape
            assert back.tobytes() == v.tobytes()
            assert np.isfortran(back) == np.isfortran(v) or not v.flags.contiguous
        elif k == "lambda":
            assert back(1) == 2
        elif isinstance(v, dict):
            assert back["nested"][:4] == v["nested"][:4]
            assert np.array_equal(back["nested"][4], v["nested"][4])
        else:
            assert type(back) is type(v) and back == v
    assert not store.spilled and store.spilled_bytes == 0
    # the files stay for the next spill; deleting the keys removes them
    assert len(os.listdir(store.directory)) == len(values) and set(store.kept) == set(values)
    for k in values:
        store.delete(k)
    assert not os.listdir(store.directory) and not store.kept and store.kept_bytes == 0


def test_spill_again_after_unspill_writes_nothing(store: DataStore) -> None:
    value = np.random.default_rng(1).standard_normal(50_000)
    store.put("x", value)
    assert store.spill("x")
    (name,) = os.listdir(store.directory)
    path = os.path.join(store.directory, name)
    before = os.stat(path)
    size = store.spilled_bytes
    assert size == before.st_size

    back = store.unspill("x")
    assert back.tobytes() == value.tobytes()
    assert "x" in store.memory and "x" not in store.spilled and store.spilled_bytes == 0
    assert store.kept_bytes == size and os.path.exists(path)

    counter = store._counter
    assert store.spill("x")  # only drops the in-memory reference
    assert store._counter == counter  # no new spill file was made
    assert os.listdir(store.directory) == [name]
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino, before.st_mtime_ns, before.st_size,
    )  # fmt: skip
    assert "x" not in store.memory and store.spilled_bytes == size and store.kept_bytes == 0
    assert store["x"].tobytes() == value.tobytes()
    assert store.unspill("x").tobytes() == value.tobytes()

    # a new value for the key drops the old file; a delete drops the file too
    store.put("x", b"new")
    assert not os.listdir(store.directory) and not store.kept
    assert store.spill("x") and store.unspill("x") == b"new" and store.spill("x")
    assert store["x"] == b"new"
    store.unspill("x")
    store.delete("x")
    assert not os.listdir(store.directory) and "x" not in store and store.kept_bytes == 0


def test_delete_put_and_close(store: DataStore) -> None:
    store.put("a", b"1" * 100)
    store.put("b", b"2" * 100)
    store.spill("a")
    assert set(store) == {"a", "b"} and len(store) == 2 and "a" in store
    store.put("a", b"3")  # a new value replaces the spilled one
    assert store["a"] == b"3" and not store.spilled
    store.spill("b")
    store.delete("b")
    store.delete("never-there")
    assert "b" not in store and not os.listdir(store.directory)
    with pytest.raises(KeyError):
        store["b"]
    directory = store.directory
    store.spill("a")
    store.close()
    assert not os.path.exists(directory)


def test_unpicklable_value_stays_in_memory_with_one_warning(store: DataStore) -> None:
    lock1, lock2 = threading.Lock(), threading.Lock()
    store.put("lock1", lock1)
    store.put("lock2", lock2)
    with pytest.warns(TrioSchedulerWarning, match="cannot be pickled") as record:
        assert not store.spill("lock1")
        assert not store.spill("lock2")
    assert len(record) == 1
    assert store["lock1"] is lock1 and store["lock2"] is lock2
    assert not store.spilled and not os.listdir(store.directory)


def test_concurrent_reads_while_unspilling(store: DataStore) -> None:
    value = np.arange(100_000)
    store.put("x", value)
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                assert np.array_equal(store["x"], value)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    for _ in range(200):
        store.spill("x")
        store.unspill("x")
    stop.set()
    t.join()
    assert not errors


def spill_files(store: DataStore) -> list[str]:
    return sorted(os.listdir(store.directory))


def test_value_being_written_is_served_and_booked_when_done(store: DataStore) -> None:
    value = np.arange(300_000, dtype=np.float64)  # 2.4 MB: written and read with O_DIRECT
    store.put("x", value)
    job = store.begin_spill("x", value.nbytes)
    assert job is not None and "x" not in store.memory and store.writing_bytes == value.nbytes
    assert store["x"] is value and "x" in store and list(store) == ["x"]  # still served
    write_spills([job])  # what the worker runs in a thread
    assert store.finish_spill(job) is None
    assert store.writing_bytes == 0 and "x" in store.spilled and len(spill_files(store)) == 1
    back = store["x"]
    assert back is not value and np.array_equal(back, value) and back.flags.writeable
    assert back.ctypes.data % 4096 == value.ctypes.data % 4096  # at its original alignment
    back[0] = -1.0  # its own memory: the file keeps the stored value
    assert store["x"][0] == 0.0


def test_delete_or_replace_mid_write_leaves_no_file(store: DataStore) -> None:
    store.put("a", np.ones(1000))
    store.put("b", np.ones(1000))
    job_a, job_b = store.begin_spill("a", 8000), store.begin_spill("b", 8000)
    assert job_a is not None and job_b is not None
    store.delete("a")  # released while its file is being written
    store.put("b", b"new value")  # replaced while its file is being written
    assert store.writing_bytes == 0
    write_spills([job_a, job_b])
    assert len(spill_files(store)) == 2  # the writes happened...
    assert store.finish_spill(job_a) is None and store.finish_spill(job_b) is None
    assert spill_files(store) == []  # ...and their files are gone
    assert "a" not in store and store["b"] == b"new value" and not store.spilled


def test_wanted_back_mid_write_keeps_the_file(store: DataStore) -> None:
    value = np.arange(1000)
    store.put("x", value)
    job = store.begin_spill("x", value.nbytes)
    assert job is not None
    store.want("x")  # the core booked it back in memory before the write finished
    assert store.memory["x"] is value and store.writing_bytes == 0
    write_spills([job])
    assert store.finish_spill(job) is None
    assert "x" in store.kept and len(spill_files(store)) == 1
    counter = store._counter
    assert store.begin_spill("x", value.nbytes) is None  # the kept file is reused
    assert store._counter == counter and "x" in store.spilled


def test_wanted_key_moves_to_memory_on_first_read(store: DataStore) -> None:
    value = np.arange(1000)
    store.put("x", value)
    store.spill("x")
    assert np.array_equal(store["x"], value) and "x" in store.spilled  # a peek stays on disk
    store.want("x")
    assert "x" in store.spilled  # no disk read on the owner's thread
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(store["x"]))  # a task thread's read
    t.start()
    t.join()
    assert store.memory["x"] is result[0] and "x" in store.kept and not store.wanted
    assert store.spilled_bytes == 0 and store.kept_bytes > 0
    # spilled again before the read: the read does not bring it back
    store.spill("x")
    store.want("x")
    store.spill("x")
    assert np.array_equal(store["x"], value) and "x" in store.spilled and not store.memory


def test_failed_write_puts_the_value_back(store: DataStore) -> None:
    lock = threading.Lock()
    store.put("lock", lock)
    job = store.begin_spill("lock", 64)
    assert job is not None
    write_spills([job])
    with pytest.warns(TrioSchedulerWarning, match="cannot be pickled"):
        error = store.finish_spill(job)
    assert isinstance(error, UnpicklableValue)
    assert store.memory["lock"] is lock and not store.writing and spill_files(store) == []


def test_write_error_puts_the_value_back_and_is_reported(store: DataStore) -> None:
    value = np.arange(1000)
    store.put("x", value)
    job = store.begin_spill("x", value.nbytes)
    assert job is not None
    os.rmdir(store.directory)  # the disk went away under the worker
    write_spills([job])
    error = store.finish_spill(job)
    assert isinstance(error, OSError) and not isinstance(error, UnpicklableValue)
    assert store.memory["x"] is value and not store.writing and store.writing_bytes == 0
    with pytest.raises(OSError):
        store.spill("x")  # the synchronous form raises it
    assert store.memory["x"] is value
