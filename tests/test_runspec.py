from __future__ import annotations

import threading
from typing import Any

import pytest

from trioscheduler.wire import runspec
from trioscheduler.wire.runspec import (
    RunSpecLoadError,
    UnpicklableArgumentError,
    pack,
    register_reference,
    run,
)


class Ref:
    def __init__(self, key: str) -> None:
        self.key = key


register_reference(Ref, lambda r: r.key)


def test_round_trip_with_lambda_and_kwargs() -> None:
    spec, deps = pack(lambda a, b=1: a + b, (2,), {"b": 5})
    assert deps == []
    assert run(spec, {}) == 7


def test_references_become_dependencies_and_resolve() -> None:
    spec, deps = pack(sum, ([Ref("x"), Ref("y"), Ref("x")],), {})
    assert deps == ["x", "y"]
    assert run(spec, {"x": 1, "y": 10}) == 12


def test_unpicklable_argument_is_named() -> None:
    with pytest.raises(UnpicklableArgumentError, match="positional argument 1"):
        pack(print, (1, threading.Lock()), {})
    with pytest.raises(UnpicklableArgumentError, match="keyword argument 'lock'"):
        pack(print, (), {"lock": threading.Lock()})


def test_missing_dependency_value_is_a_clear_error() -> None:
    spec, _ = pack(len, (Ref("gone"),), {})
    with pytest.raises(RunSpecLoadError, match="'gone'"):
        run(spec, {})


def test_garbage_run_spec_is_a_load_error() -> None:
    with pytest.raises(RunSpecLoadError, match="could not load"):
        run(b"not a pickle", {})


def test_a_task_without_dependencies_loads_as_any_other() -> None:
    # unpack_alone: the quick tasks' loader (no reference in a spec without dependencies)
    spec, _ = pack(pow, (2, 5), {})
    assert runspec.unpack_alone(spec, {}) == runspec.unpack(spec, {}) == (pow, (2, 5), {})
    spec, _ = pack(sum, ([Ref("x"), 1],), {})  # a reference after all: resolved as unpack does
    assert runspec.unpack_alone(spec, {"x": 10}) == (sum, ([10, 1],), {})
    with pytest.raises(RunSpecLoadError, match="'gone'"):
        runspec.unpack_alone(pack(len, (Ref("gone"),), {})[0], {})
    for bad in (b"not a pickle", b"\x80\x05K\x01."):  # garbage; not a (func, args, kwargs)
        with pytest.raises(RunSpecLoadError, match="could not load the task's function"):
            runspec.unpack_alone(bad, {})


def _nbytes_plus(a: Any, k: int = 0) -> int:
    return int(a.nbytes) + k


def test_large_arguments_ride_out_of_band_without_a_copy() -> None:
    import numpy as np

    from trioscheduler.wire import serialize

    a = np.arange(1 << 20, dtype=np.float64)  # 8 MB
    spec, deps = runspec.pack(_nbytes_plus, (a,), {"k": 1})
    assert isinstance(spec, runspec.OutOfBandRunSpec) and deps == []
    assert len(spec.data) < 4096  # the array is not in the pickle...
    assert np.shares_memory(np.frombuffer(spec.buffers[0], dtype=np.float64), a)  # ...nor copied
    hop = serialize.loads(serialize.dumps({"spec": spec}))["spec"]  # client -> scheduler
    hop = serialize.loads(serialize.dumps_batch([hop]))[0]  # scheduler -> worker, batched
    assert hop == spec
    func, args, kwargs = runspec.unpack(hop, {})
    assert func(*args, **kwargs) == a.nbytes + 1 and np.array_equal(args[0], a)
    small, _ = runspec.pack(_nbytes_plus, (np.arange(10),), {})
    assert isinstance(small, bytes)  # small buffers: one self-contained pickle


def test_a_large_argument_reaches_the_worker_through_the_scheduler() -> None:
    """The scheduler keeps an out-of-band run spec as it keeps bytes (its compiled core
    took only bytes and dropped the client's connection on a large ``submit``)."""
    import numpy as np

    from trioscheduler import Client, LocalCluster

    kw: dict[str, Any] = {"n_workers": 1, "processes": False, "dashboard_address": None}
    with LocalCluster(**kw) as cluster, Client(cluster) as client:
        a = np.arange(1 << 17, dtype=np.float64)  # 1 MB
        assert client.submit(_nbytes_plus, a, k=1).result(timeout=60) == a.nbytes + 1


    """``map``'s fast path: the same bytes as ``pack`` for a function pickled by
    reference (or shipped by value once) and plain arguments; refused where cloudpickle
    is needed."""
    from operator import add

    from trioscheduler.client.keys import plain, shippable

    for func in (add, shippable(lambda a, b: a + b)):
        packer = runspec.plain_packer(func, {})
        assert packer is not None
        for args in [(1, 2), (1.5, True), ("x", "y"), (b"a", b"b"), (None, None)]:
            assert plain(args)
            assert packer(args) == pack(func, args, {})[0]
        assert run(packer((2, 3)), {}) == 5
    assert runspec.plain_packer(lambda a: a, {}) is None  # a lambda not shipped first
    assert runspec.plain_packer(add, {"lock": threading.Lock()}) is None
    assert not plain((Ref("k"),)) and not plain(([1],)) and not plain(("x" * 5000,))


def test_plain_map_keys_are_stable_and_tell_types_apart() -> None:
    from trioscheduler.client.keys import map_keys

    calls = [(1,), (1.0,), (True,), ("1",), (b"1",), (None,), ((1,),)]
    keys = map_keys(abs, calls, {}, None, True)
    assert len(set(keys)) == len(calls)
    assert keys == map_keys(abs, calls, {}, None, True)  # the same calls, the same keys
    assert keys != map_keys(abs, calls, {"x": 1}, None, True)
    assert all(k.startswith("abs-") for k in keys)


def test_submit_packs_plain_calls_as_pack_does() -> None:
    import functools

    from trioscheduler.client.keys import check_key

    assert runspec.pack_plain_call(check_key, ("k",)) == pack(check_key, ("k",), {})[0]
    assert runspec.pack_plain_call(check_key, ("k",)) == pack(check_key, ("k",), {})[0]
    assert runspec.pack_plain_call(lambda a: a, (1,)) is None  # needs cloudpickle
    assert runspec.pack_plain_call(functools.partial(check_key, "k"), ()) is None


def test_a_by_value_function_travels_once_for_many_calls() -> None:
    import pickle

    from trioscheduler.core import messages
    from trioscheduler.wire import serialize

    offset = 3

    def f(x: int, k: int = 0) -> int:  # a closure: cloudpickle ships it by value
        return x + offset + k

    f.__module__ = "__main__"  # as a function of the user's script

    assert runspec.plain_packer(f, {"k": 1}) is None
    pack_shared = runspec.shared_packer(f, {"k": 1})
    assert pack_shared is not None
    specs = [pack_shared((i,)) for i in range(1000)]
    assert [run(s, {}) for s in specs] == [i + 4 for i in range(1000)]
    one = len(pickle.dumps(specs[0]))
    assert one > 200 and len(pickle.dumps(specs)) < one + 1000 * 40  # the function once
    graph = messages.UpdateGraph(
        "s", 0.0, "c", [messages.TaskSpec(f"f-{i}", [], s) for i, s in enumerate(specs)], []
    )
    frames = serialize.dumps_batch([graph])
    assert len(frames) == 2  # pickled (the function's own __main__ does not show)
    back = serialize.loads(frames)[0]
    assert len({id(t.run_spec[0]) for t in back.tasks}) == 1  # one copy on the receiver
    assert run(back.tasks[5].run_spec, {}) == 9
    assert runspec.shared_packer(lambda: threading.Lock(), {"k": threading.Lock()}) is None


def test_a_shared_run_spec_that_cannot_load_is_a_load_error() -> None:
    with pytest.raises(RunSpecLoadError, match="could not load"):
        run((b"garbage", b"garbage"), {})
