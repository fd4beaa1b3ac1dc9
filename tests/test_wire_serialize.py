"""Serialization: what users put in messages comes back as the same types, buffers uncopied."""

from __future__ import annotations

import copyreg
import gc
import pickle
import threading
import weakref

import numpy as np
import pandas as pd
import pytest

from trioscheduler.core import messages
from trioscheduler.wire import AddressError, parse_address
from trioscheduler.wire.serialize import (
    OUT_OF_BAND_BYTES,
    PICKLED_BATCH_MAX,
    Batch,
    DeserializationError,
    Frame,
    SerializationError,
    dumps,
    dumps_batch,
    loads,
)


def round_trip(msg: object) -> object:
    # Through a fresh bytearray per frame, as the TCP receiver hands them over.
    return loads([bytearray(f) for f in dumps(msg)])


def test_tuples_stay_tuples_even_as_keys() -> None:
    msg = {("x", 0): [("x", 1), (), ((1, 2), [3])], "t": (1, "a", None, 2.5, True)}
    back = round_trip(msg)
    assert back == msg
    assert type(back[("x", 0)][0]) is tuple  # type: ignore[index]
    assert type(back[("x", 0)][2][1]) is list  # type: ignore[index]


def test_core_messages_come_back_as_records() -> None:
    spec = messages.TaskSpec(("f", 1), [("g", 0)], b"run", priority=3)
    graph = messages.UpdateGraph("s1", 1.5, "client-1", [spec], [("f", 1)])
    wrapped = messages.ToWorker("tcp://w:1", messages.FreeKeys("s2", 2.0, [("x", 3)]))
    back = round_trip({"events": [graph, wrapped]})
    assert back == {"events": [graph, wrapped]}
    assert type(back["events"][0].tasks[0]) is messages.TaskSpec  # type: ignore[index]
    assert back["events"][0].tasks[0].key == ("f", 1)  # type: ignore[index]


def test_every_registered_message_round_trips() -> None:
    for cls in messages.ALL_MESSAGES:
        if cls in messages._NESTED:  # records holding records: the test above
            continue
        names = messages._FIELDS[cls]
        obj = cls(*[("k", i) if n == "key" else None for i, n in enumerate(names)])
        assert round_trip(obj) == obj


@pytest.mark.parametrize("size", [10, OUT_OF_BAND_BYTES, 1_000_000])
def test_buffers_keep_their_contents(size: int) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    for value in (data, bytearray(data), memoryview(data)):
        back = round_trip({"v": value, "in": [value]})
        assert back["v"] == value and back["in"][0] == value  # type: ignore[index]


def test_large_buffers_travel_out_of_band_with_their_type() -> None:
    big = b"x" * (2 * OUT_OF_BAND_BYTES)
    frames = dumps({"a": big, "b": [bytearray(big)], "c": (memoryview(big),)})
    assert len(frames[0]) < 200  # the header holds references, not the data
    back = round_trip({"a": big, "b": [bytearray(big)]})
    assert type(back["a"]) is bytes and type(back["b"][0]) is bytearray  # type: ignore[index]


def test_numpy_buffers_are_not_copied_on_either_side() -> None:
    arr = np.arange(1_000_000, dtype="f8").reshape(1000, 1000)
    frames = dumps(("data", arr))
    assert sum(len(f) for f in frames[1:] if np.shares_memory(np.frombuffer(f, "u1"), arr)) == arr.nbytes
    received = [bytearray(f) for f in frames]
    back = loads(received)
    assert np.array_equal(back[1], arr)
    biggest = max(received[1:], key=len)
    assert np.shares_memory(back[1], np.frombuffer(biggest, "u1"))
    assert back[1].flags.writeable


def test_non_contiguous_and_odd_arrays() -> None:
    base = np.arange(60, dtype="i4").reshape(6, 10)
    for arr in (base[::2, ::3], base.T, np.array(["a", "bc"]), np.zeros(0), np.float16(3)):
        back = round_trip(arr)
        assert type(back) is type(arr)
        np.testing.assert_array_equal(back, arr)  # type: ignore[arg-type]


def test_pandas_dataframe() -> None:
    df = pd.DataFrame({"a": np.arange(10_000), "b": np.random.default_rng(0).random(10_000), "c": ["x"] * 10_000})
    pd.testing.assert_frame_equal(round_trip(df), df)  # type: ignore[arg-type]


def test_functions_lambdas_and_closures() -> None:
    offset = 10

    def add(x: int) -> int:
        return x + offset

    back = round_trip({"f": add, "g": lambda x: x * 2, "h": len})
    assert back["f"](1) == 11 and back["g"](3) == 6 and back["h"]("ab") == 2  # type: ignore[index]


def test_plain_objects_and_big_ints() -> None:
    msg = {"big": 2**100, "neg": -(2**70), "set": {1, 2}, "exc": ValueError("bad"), "none": None}
    back = round_trip(msg)
    assert back["big"] == 2**100 and back["neg"] == -(2**70) and back["set"] == {1, 2}  # type: ignore[index]
    assert isinstance(back["exc"], ValueError) and back["exc"].args == ("bad",)  # type: ignore[index]


def test_unserializable_object_names_its_type() -> None:
    with pytest.raises(SerializationError, match="lock"):
        dumps({"x": threading.Lock()})


def test_garbage_frames_raise_deserialization_error() -> None:
    header = dumps({"a": ValueError("x")})
    for frames in ([], [b"\xc1"], [b"\x92\x01"], header[:1], [header[0], b"not a pickle"]):
        with pytest.raises(DeserializationError):
            loads(frames)


def test_payload_that_fails_to_unpickle() -> None:
    frames = dumps({"obj": ValueError("x")})
    frames[1] = pickle.dumps(ValueError("x")).replace(b"builtins", b"nomodule")
    with pytest.raises(DeserializationError, match="nomodule"):
        loads(frames)


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("tcp://127.0.0.1:8786", ("tcp", "127.0.0.1", 8786)),
        ("127.0.0.1:8786", ("tcp", "127.0.0.1", 8786)),
        ("tcp://[::1]:0", ("tcp", "::1", 0)),
        ("tcp://localhost:1", ("tcp", "localhost", 1)),
        ("tls://[::1]:8786", ("tls", "::1", 8786)),
        ("inproc://sched", ("inproc", "sched", None)),
        ("inproc://", ("inproc", "", None)),
    ],
)
def test_parse_address(address: str, parsed: tuple[str, str, int | None]) -> None:
    assert parse_address(address) == parsed


@pytest.mark.parametrize(
    ("address", "complaint"),
    [
        ("ws://a:1", "unsupported scheme"),
        ("tcp://host", "no port"),
        ("tcp://:80", "no host"),
        ("tcp://h:http", "bad port"),
        ("tcp://h:70000", "out of range"),
        ("tcp://[::1]80", "IPv6"),
    ],
)
def test_bad_addresses_say_what_is_wrong(address: str, complaint: str) -> None:
    with pytest.raises(AddressError, match=complaint):
        parse_address(address)


def test_large_messages_keep_big_buffers_out_of_the_header() -> None:
    tasks = [messages.TaskSpec(("inc", i), [("inc", i - 1)], b"f" * 100) for i in range(2000)]
    tasks.append(messages.TaskSpec("closure", [], b"c" * 200_000))  # a big pickled closure
    graph = messages.UpdateGraph("s", 1.0, "client", tasks, [("inc", 1999)])
    msg = {"graph": graph, "blobs": [b"x" * 50_000, (bytearray(b"y" * 50_000),)], "text": "t" * 20_000}
    frames = dumps(msg)
    assert len(frames[0]) < 2000 * 200  # the 300 kB of large buffers travel as frames
    assert sorted(len(f) for f in frames[1:]) == [50_000, 50_000, 200_000]
    back = round_trip(msg)
    assert back == msg
    assert type(back["blobs"][1][0]) is bytearray  # type: ignore[index]


def batch_round_trip(msgs: list[object]) -> tuple[list[object], list[Frame]]:
    frames = dumps_batch(msgs)
    back = loads([bytearray(f) for f in frames])
    assert type(back) is Batch
    return list(back), frames


def test_a_batch_keeps_tuples_lists_and_records() -> None:
    spec = messages.TaskSpec(("f", 1), [("g", 0)], b"run", priority=3)
    graph = messages.UpdateGraph("s1", 1.5, "client-1", [spec], [("f", 1)])
    wrapped = messages.ToWorker("tcp://w:1", messages.FreeKeys("s2", 2.0, [("x", 3)]))
    msgs: list[object] = [
        {("x", 0): [("x", 1), (), ((1, 2), [3])]},
        graph,
        wrapped,
        ("x", [1, (2,)]),
        np.arange(10),
    ]
    back, frames = batch_round_trip(msgs)
    assert back[:4] == msgs[:4]
    assert type(back[0][("x", 0)][2][1]) is list  # type: ignore[index]
    assert type(back[1].tasks[0]) is messages.TaskSpec  # type: ignore[attr-defined]
    assert type(back[2].msg) is messages.FreeKeys  # type: ignore[attr-defined]
    np.testing.assert_array_equal(back[4], msgs[4])  # type: ignore[arg-type]
    for cls in messages.ALL_MESSAGES:  # every record, with its own reducer
        if cls in messages._NESTED:
            continue
        names = messages._FIELDS[cls]
        obj = cls(*[("k", i) if n == "key" else None for i, n in enumerate(names)])
        assert batch_round_trip([obj])[0] == [obj]


class Payload:
    def __init__(self, n: int) -> None:
        self.n = n

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Payload) and other.n == self.n


def test_a_batch_leaves_nothing_of_its_messages_behind() -> None:
    # picklers of small batches are kept for the next one: not with their memo
    payload = Payload(1)
    gone = weakref.ref(payload)
    for _ in range(3):
        assert batch_round_trip([{"value": payload}])[0] == [{"value": payload}]
    del payload
    assert gone() is None


def test_a_reducer_registered_after_batches_were_pickled_is_used() -> None:
    assert batch_round_trip([Payload(2)])[0] == [Payload(2)]
    copyreg.pickle(Payload, lambda p: (Payload, (p.n * 10,)))
    try:
        assert batch_round_trip([Payload(2)])[0] == [Payload(20)]
    finally:
        del copyreg.dispatch_table[Payload]
    assert batch_round_trip([Payload(2)])[0] == [Payload(2)]


def test_a_pickled_batch_names_a_record_class_once_at_most() -> None:
    # a class's first record in a batch goes by a copyreg extension code (loading it is
    # a dict lookup, no import); the others name the class once and refer back to it
    finished = [messages.TaskFinished("s", 1.0, "tcp://w:1", f"k{i}", 8) for i in range(3)]
    msgs = [finished[0], messages.FreeKeys("s", 1.0, ["k"])]
    frames = dumps_batch(msgs)
    assert b"TaskFinished" not in frames[1] and b"FreeKeys" not in frames[1]
    assert batch_round_trip(msgs)[0] == msgs
    frames = dumps_batch(finished)
    assert frames[1].count(b"TaskFinished") == 1
    assert batch_round_trip(finished)[0] == finished
    codes = [
        copyreg._extension_registry.get(("trioscheduler.wire.serialize", f"_new_{c.tag.replace('-', '_')}"))
        for c in messages._FIELDS
    ]
    assert None not in codes and len(set(codes)) == len(codes)


def test_a_batch_pickle_cannot_take_goes_through_msgpack() -> None:
    offset = 3
    msgs: list[object] = [lambda x: x + offset, memoryview(b"abc"), ("k", 1)]
    back, _ = batch_round_trip(msgs)
    assert back[0](1) == 4  # type: ignore[operator]
    assert back[1:] == [b"abc", ("k", 1)]


def test_a_large_batch_keeps_big_buffers_out_of_the_header() -> None:
    big = b"x" * PICKLED_BATCH_MAX
    back, frames = batch_round_trip([("k", 1), {"data": big}])
    assert back == [("k", 1), {"data": big}]
    assert len(frames[0]) < 1000 and any(len(f) == len(big) for f in frames[1:])


def test_a_large_batch_of_many_small_records_stays_one_pickle() -> None:
    # A map's graph message: 10,000 small tasks pickle to more than PICKLED_BATCH_MAX,
    # and walking them with msgpack would cost ~6x pickling them.
    specs = [messages.TaskSpec(f"inc-{i:032x}", [], b"%060d" % i) for i in range(10_000)]
    graph = messages.UpdateGraph("s1", 1.5, "client-1", specs, [s.key for s in specs])
    back, frames = batch_round_trip([graph])
    assert back == [graph]
    assert len(frames) == 2 and sum(map(len, frames)) > PICKLED_BATCH_MAX
    assert loads([frames[0], b"\x80\x05]."]) == []  # the header only points at the pickle


def test_a_pickled_batch_must_hold_a_list() -> None:
    header = dumps_batch([1])[0]
    with pytest.raises(DeserializationError, match="pickled batch holds a NoneType"):
        loads([header, b"\x80\x05N."])
    with pytest.raises(DeserializationError, match="cannot decode"):
        loads([header, b"\x80\x05not a pickle"])


def test_dumps_leaves_no_reference_cycles() -> None:
    # Each encoder used to be a cycle (packer -> bound method -> encoder), so every
    # small message left its encoder and a packer buffer to the garbage collector.
    gc.collect()
    gc.disable()
    try:
        for i in range(100):
            dumps({"op": "x", "key": ("k", i), "f": len})
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_a_large_batch_with_a_big_string_among_small_records_goes_out_of_band() -> None:
    specs = [messages.TaskSpec(f"inc-{i:032x}", [], b"%060d" % i) for i in range(10_000)]
    specs[7].run_spec = big = b"y" * (1 << 17)  # in line in a pickle
    graph = messages.UpdateGraph("s1", 1.5, "client-1", specs, [s.key for s in specs])
    back, frames = batch_round_trip([graph])
    assert back == [graph]
    assert any(f == big for f in frames[1:]) and big not in frames[0]
