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

