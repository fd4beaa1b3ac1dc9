"""What a task is called and what travels with it: keys, placement options, functions.

Everything here runs at ``submit``/``map`` time in the caller's thread, so a bad
argument fails there with a message that says what to pass instead, and the per-task
cost of ``map`` (naming, pickling the function) is paid once where it can be.

Keys follow dask: a pure call is named ``funcname-<tokenize(func, kwargs, *args)>`` so the
same call is the same key (computed once); an impure call gets a random suffix.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any, Final

import cloudpickle
from dask.base import tokenize
from dask.utils import funcname

__all__ = [
    "check_key",
    "check_options",
    "check_resources",
    "check_workers",
    "map_keys",
    "map_namer",
    "plain",
    "scatter_key",
    "shippable",
    "submit_key",
]

SHIP_BY_VALUE_OVER = 256
"""Bytes: a function that pickles bigger than this (by value) is pickled once per map."""
KEY_TYPES = (str, bytes, int, float, tuple)


def submit_key(
    func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any], pure: bool
) -> str:
    if pure:
        return f"{funcname(func)}-{tokenize(func, kwargs, *args)}"
    return f"{funcname(func)}-{uuid4_hex()}"


def uuid4_hex() -> str:
    """``uuid.uuid4().hex``, the same bits (version 4, RFC 4122 variant), without the
    ``UUID`` object: ~1.3 us instead of ~5 on a ``submit(pure=False)``'s critical path."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    return b.hex()


def map_keys(
    func: Callable[..., Any],
    calls: Sequence[tuple[Any, ...]],
    kwargs: Mapping[str, Any],
    key: Any,
    pure: bool,
) -> list[Any]:
    """One key per call: from the ``key=`` list, or ``<prefix>-<token>`` as dask's map."""
    if isinstance(key, (list, tuple)) and len(key) != len(calls):
        raise ValueError(f"map() got {len(key)} keys for {len(calls)} tasks")
    return map_namer(func, kwargs, key, pure)(calls, 0)


def map_namer(
    func: Callable[..., Any], kwargs: Mapping[str, Any], key: Any, pure: bool
) -> Callable[[Sequence[tuple[Any, ...]], int], list[Any]]:
    """``name(calls, start)``: the keys of a run of calls of one ``map``, the first being
    call number ``start``; what depends only on the map (its token, its random id) is
    computed once, so a map named batch by batch gets the keys it would get at once."""
    if isinstance(key, (list, tuple)):
        for k in key:
            check_key(k)
        keys = list(key)
        return lambda calls, start: keys[start : start + len(calls)]
    prefix = key if isinstance(key, str) else funcname(func)
    if pure:
        tok = tokenize(func, kwargs)
        return lambda calls, start: [
            f"{prefix}-{plain_token(tok, args) if plain(args) else tokenize(tok, args)}"
            for args in calls
        ]
    uid = uuid4_hex()
    return lambda calls, start: [
        f"{prefix}-{uid}-{i}" for i in range(start, start + len(calls))
    ]


_PLAIN: Final = frozenset({int, float, str, bytes, bool, type(None)})
PLAIN_MAX_CHARS: Final = 4096
"""A ``str``/``bytes`` argument longer than this goes the usual way (``tokenize``,
``runspec.pack``): large buffers have their own paths there."""


def plain(args: tuple[Any, ...]) -> bool:
    """Are ``args`` only scalars whose ``repr`` says exactly what they are (and short)?"""
    for a in args:
        t = type(a)
        if t not in _PLAIN or ((t is str or t is bytes) and len(a) > PLAIN_MAX_CHARS):
            return False
    return True


def plain_token(tok: str, args: tuple[Any, ...]) -> str:
    """``tokenize(tok, args)``'s job for ``plain`` arguments, ~4x faster: their ``repr``
    is deterministic and tells ``1``, ``1.0``, ``True`` and ``'1'`` apart. (A different
    hash than ``tokenize``'s, so the same call through both paths would get two keys;
    ``map`` takes one path per argument tuple, always the same.)"""
    return hashlib.md5(f"plain-{tok}-{args!r}".encode(), usedforsecurity=False).hexdigest()


#: A scattered ``bytes`` of at least this many bytes is keyed by the SHA-1 of its
#: contents (40 hex digits), not by dask's ``tokenize``: that hashes the ``repr`` of the
#: bytes (four characters a byte), holding the GIL all along: 20-35 s for 500 MB, during
#: which the client's connections time out. A different key than dask's for the same
#: value (``docs/dask-compatibility.md``), still one per content.
LARGE_BYTES_KEY: Final = 1 << 20


def scatter_key(value: Any, hash: bool) -> str:
    """``<type>-<token>``: dask's ``tokenize`` of the value (``hash``) or a random id."""
    if not hash:
        return f"{type(value).__name__}-{uuid4_hex()}"
    if type(value) is bytes and len(value) >= LARGE_BYTES_KEY:
        return f"bytes-{hashlib.sha1(value, usedforsecurity=False).hexdigest()}"
    return f"{type(value).__name__}-{tokenize(value)}"


def check_key(key: Any) -> None:
    if not isinstance(key, KEY_TYPES):
        raise TypeError(
            f"a key must be a str, bytes, int, float or tuple of those, got {key!r:.100}"
        )


def check_workers(workers: Any) -> list[str] | None:
    if workers is None:
        return None
    if isinstance(workers, (str, int)) and not isinstance(workers, bool):
        return [str(workers)]
    if isinstance(workers, (list, tuple, set, frozenset)):
        out: list[str] = []
        for w in workers:
            if not isinstance(w, (str, int)) or isinstance(w, bool):
                break
            out.append(str(w))
        else:
            return out
    raise TypeError(
        f"workers= takes a worker address or name, or a list of them, e.g. "
        f"workers=['tcp://127.0.0.1:4000'] or workers='alice'; got {workers!r:.100}"
    )


def check_resources(resources: Any) -> dict[str, float] | None:
    if resources is None:
        return None
    if isinstance(resources, Mapping):
        out: dict[str, float] = {}
        for name, amount in resources.items():
            if not isinstance(name, str):
                break
            if isinstance(amount, bool) or not isinstance(amount, (int, float)):
                break
            if amount < 0:
                raise ValueError(f"resources= amounts must be >= 0; {name!r} asks for {amount}")
            out[name] = amount
        else:
            return out
    raise TypeError(
        f"resources= takes a mapping of resource name to amount, e.g. {{'GPU': 1}}; "
        f"got {resources!r:.100}"
    )


def check_options(
    workers: Any, resources: Any, retries: Any, priority: Any, allow_other_workers: Any
) -> tuple[list[str] | None, dict[str, float] | None, int, int, bool]:
    w = check_workers(workers)
    r = check_resources(resources)
    if retries is None:
        retries = 0
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise TypeError(f"retries= takes a number >= 0, got {retries!r}")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"priority= takes an integer (higher runs first), got {priority!r}")
    if allow_other_workers not in (True, False, None):
        raise TypeError(f"allow_other_workers= takes True or False, got {allow_other_workers!r}")
    if allow_other_workers and w is None:
        raise ValueError("allow_other_workers=True only makes sense together with workers=")
    return w, r, retries, priority, bool(allow_other_workers)


class _Shipped:
    """A function pickled once per ``map``; unpickles to the function itself (cached)."""

    __slots__ = ("__name__", "blob")

    def __init__(self, func: Callable[..., Any], blob: bytes) -> None:
        self.blob = blob
        self.__name__ = funcname(func)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_load_function, (self.blob,))


@lru_cache(maxsize=64)
def _load_function(blob: bytes) -> Any:
    return pickle.loads(blob)


def shippable(func: Callable[..., Any]) -> Any:
    """``func`` as it should go into many run specs: itself when it pickles by
    reference (small), else pickled once by value (lambdas, closures, ``__main__``)."""
    try:
        blob = cloudpickle.dumps(func, protocol=5)
    except Exception:
        return func  # runspec.pack reports the failure with the culprit named
    return func if len(blob) <= SHIP_BY_VALUE_OVER else _Shipped(func, blob)
