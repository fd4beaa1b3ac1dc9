"""Property: any nested message of the kinds users send comes back equal, on both transports."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from trioscheduler.wire import Stream, connect, listen
from trioscheduler.wire.serialize import Batch, dumps_batch, loads

DTYPES = ["i1", "u2", "i8", "f4", "f8", "c16", "bool", "M8[ns]", "U3"]


@st.composite
def arrays(draw: Callable[[st.SearchStrategy[Any]], Any]) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    elements = None
    if dtype.kind == "f" or dtype.kind == "c":
        elements = hnp.from_dtype(dtype, allow_nan=False)
    arr = draw(hnp.arrays(dtype, hnp.array_shapes(max_dims=3, max_side=6), elements=elements))
    view = draw(st.sampled_from(["as-is", "strided", "transposed", "fortran"]))
    if view == "strided":
        return arr[::2]
    if view == "transposed":
        return arr.T
    if view == "fortran":
        return np.asfortranarray(arr)
    return arr


@st.composite
def frames(draw: Callable[[st.SearchStrategy[Any]], Any]) -> pd.DataFrame:
    n = draw(st.integers(0, 20))
    return pd.DataFrame(
        {
            "i": draw(st.lists(st.integers(-(2**40), 2**40), min_size=n, max_size=n)),
            "f": draw(st.lists(st.floats(allow_nan=False), min_size=n, max_size=n)),
            "s": draw(st.lists(st.text(max_size=5), min_size=n, max_size=n)),
        }
    )


keys = st.one_of(st.text(max_size=8), st.integers(), st.tuples(st.text(max_size=4), st.integers()))
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(),
    st.binary(),
    st.binary(min_size=20_000, max_size=40_000),  # out of band
    arrays(),
    frames(),
)
messages = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=12,
)


def assert_same(a: Any, b: Any) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


async def echo(stream: Stream) -> None:
    async for msg in stream:
        await stream.send(msg)


@pytest.mark.parametrize("transport", ["tcp://127.0.0.1:0", "inproc://"])
@given(msg=messages)
async def test_nested_messages_round_trip(transport: str, msg: Any) -> None:
    async with listen(transport, echo) as lst:
        async with await connect(lst.address) as stream:
            await stream.send(msg)
            assert_same(await stream.receive(), msg)


@settings(suppress_health_check=[HealthCheck.data_too_large, HealthCheck.too_slow])
@given(msgs=st.lists(messages, min_size=1, max_size=4))
def test_batches_round_trip_in_order(msgs: list[Any]) -> None:
    # One pickle, or (large, or something pickle refuses) msgpack: the receiver can't tell.
    frames = dumps_batch(msgs)
    got = loads([bytearray(f) for f in frames])  # as the TCP receiver hands frames over
    assert type(got) is Batch
    for a, b in zip(msgs, got, strict=True):
        assert_same(b, a)
