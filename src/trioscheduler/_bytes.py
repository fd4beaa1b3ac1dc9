"""``parse_bytes`` and ``format_bytes`` as ``dask.utils`` has them, without importing dask.

A worker process needs these to read its ``memory_limit``; importing ``dask.utils`` for
them cost a worker 80-150 ms of start-up (dask, toolz, yaml and the config files).
"""

from __future__ import annotations

BYTE_SIZES = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12, "p": 10**15, "pb": 10**15,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30,
    "ti": 2**40, "tib": 2**40, "pi": 2**50, "pib": 2**50,
}  # fmt: skip
"""Units, lower case: decimal (``kB``, ``MB``...) and binary (``kiB``, ``MiB``...)."""


def parse_bytes(s: str | float) -> int:
    """A number of bytes from ``"2GiB"``, ``"500MB"``, ``"1.5 GB"``, ``"100kB"``, ``"1e6"``,
    ``"MB"`` (one of the unit) or a number; units are case-insensitive, as in dask.

    Raises ``ValueError`` naming the input when it is not a number followed by a unit.
    """
    if isinstance(s, bool) or not isinstance(s, (str, int, float)):
        raise TypeError(f"parse_bytes: expected a str or a number, got {s!r}")
    if not isinstance(s, str):
        return int(s)
    text = s.replace(" ", "")
    if not any(ch.isdigit() for ch in text):
        text = "1" + text
    index = len(text)
    while index > 0 and text[index - 1].isalpha():
        index -= 1
    number, unit = text[:index], text[index:]
    try:
        n = float(number)
    except ValueError:
        raise ValueError(f"Could not interpret {number!r} as a number in {s!r}") from None
    try:
        multiplier = BYTE_SIZES[unit.lower()]
    except KeyError:
        raise ValueError(f"Could not interpret {unit!r} as a byte unit in {s!r}") from None
    return int(n * multiplier)


def format_bytes(n: int) -> str:
    """``n`` bytes as text, in binary units: ``1.21 kiB``, ``11.77 MiB``, ``1 B``."""
    for prefix, k in (("Pi", 2**50), ("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("ki", 2**10)):
        if n >= k * 0.9:
            return f"{n / k:.2f} {prefix}B"
    return f"{n} B"
