"""Our ``parse_bytes``/``format_bytes`` agree with ``dask.utils`` (which a worker no
longer imports for them) and name the bad input in their errors."""

from __future__ import annotations

import pytest
from dask.utils import format_bytes as dask_format_bytes
from dask.utils import parse_bytes as dask_parse_bytes
from hypothesis import given
from hypothesis import strategies as st

from trioscheduler._bytes import BYTE_SIZES, format_bytes, parse_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GiB", 2 * 2**30),
        ("500MB", 500 * 10**6),
        ("1.5 GB", 1_500_000_000),
        ("100kB", 100_000),
        ("100", 100),
        ("100 MB", 10**8),
        ("100M", 10**8),
        ("5.4 kB", 5400),
        ("1kiB", 1024),
        ("1e6", 10**6),
        ("1e6 kB", 10**9),
        ("MB", 10**6),
        ("gib", 2**30),
        ("3 B", 3),
        (123, 123),
        (1.5e3, 1500),
    ],
)
def test_parse_bytes(text: str | float, expected: int) -> None:
    assert parse_bytes(text) == expected
    assert parse_bytes(text) == dask_parse_bytes(text)


@pytest.mark.parametrize(
    ("text", "fragment"), [("5 foos", "'foos'"), ("x1MB", "'x1'"), ("1.2.3MB", "'1.2.3'")]
)
def test_parse_bytes_error_names_the_input(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as info:
        parse_bytes(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("bad", [None, [1], True])
def test_parse_bytes_rejects_other_types(bad: object) -> None:
    with pytest.raises(TypeError):
        parse_bytes(bad)  # type: ignore[arg-type]


@given(
    st.floats(min_value=0, max_value=1e6, allow_nan=False),
    st.sampled_from(sorted(BYTE_SIZES)),
    st.sampled_from(["", " "]),
    st.booleans(),
)
def test_parse_bytes_agrees_with_dask(number: float, unit: str, sep: str, upper: bool) -> None:
    text = f"{number!r}{sep}{unit.upper() if upper else unit}"
    assert parse_bytes(text) == dask_parse_bytes(text)


@given(st.integers(min_value=0, max_value=2**62))
def test_format_bytes_agrees_with_dask(n: int) -> None:
    assert format_bytes(n) == dask_format_bytes(n)


def test_format_bytes_examples() -> None:
    assert format_bytes(1) == "1 B"
    assert format_bytes(1234) == "1.21 kiB"
    assert format_bytes(12345678) == "11.77 MiB"
    assert format_bytes(1234567890) == "1.15 GiB"
