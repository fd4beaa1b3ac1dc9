"""How the core's messages are records: the ``message`` decorator (a slotted dataclass
registered under a short tag) and ``dump``/``load`` between a record and ``[tag, *fields]``
of msgpack-native values. The vocabulary itself is ``messages``, which re-exports these."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from operator import attrgetter
from typing import Any, Final, TypeVar, dataclass_transform

_REGISTRY: dict[str, type[Any]] = {}
_FIELDS: dict[type[Any], tuple[str, ...]] = {}
_REQUIRED: dict[type[Any], int] = {}
"""How many leading fields of a record type have no default: a dumped record may stop
after them (one written before its type gained a trailing field: a recovery log)."""
_NESTED: dict[type[Any], list[tuple[int, str]]] = {}
"""Which fields of a record type hold records (``messages`` fills it): ``(index, kind)``,
kind ``one``, ``optional`` or ``list``."""
_DUMPERS: Final[dict[type[Any], Callable[[Any], list[Any]]]] = {}
"""``dump``'s per-type functions, made at first use (see ``_dumper``)."""
T = TypeVar("T")


@dataclass_transform()
def message(tag: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make a slotted dataclass and register it under ``tag``."""

    def wrap(cls: type[T]) -> type[T]:
        if tag in _REGISTRY:
            raise ValueError(f"message tag {tag!r} registered twice")
        # No generated __repr__/__eq__/__match_args__: one shared pair below does the
        # same from ``_FIELDS``, and ~60 records x 2 exec'd methods is a third of this
        # module's import time (which every spawned worker pays).
        dc = dataclass(slots=True, repr=False, eq=False, match_args=False)(cls)
        dc.tag = tag  # type: ignore[attr-defined]
        dc.__repr__ = _repr  # type: ignore[method-assign]
        dc.__eq__ = _eq  # type: ignore[method-assign]
        dc.__hash__ = None  # type: ignore[assignment]  # mutable records: unhashable, as before
        _REGISTRY[tag] = dc
        fs = fields(dc)  # type: ignore[arg-type]
        _FIELDS[dc] = tuple(f.name for f in fs)
        _REQUIRED[dc] = sum(f.default is MISSING and f.default_factory is MISSING for f in fs)
        return dc

    return wrap


def _repr(self: Any) -> str:
    args = ", ".join(f"{n}={getattr(self, n)!r}" for n in _FIELDS[type(self)])
    return f"{type(self).__qualname__}({args})"


def _eq(self: Any, other: Any) -> Any:
    """Field-wise, only between records of one type (as a dataclass's ``__eq__``)."""
    if type(other) is not type(self):
        return NotImplemented
    return all(getattr(self, n) == getattr(other, n) for n in _FIELDS[type(self)])


class MessageError(ValueError):
    """A dumped message could not be loaded: unknown tag or wrong field count (fewer
    than its fields without a default, or more than all of them)."""


def dump(obj: Any) -> list[Any]:
    """``obj`` as ``[tag, *fields]``; nested registered records are dumped too."""
    dumper = _DUMPERS.get(type(obj))
    if dumper is None:
        dumper = _DUMPERS[type(obj)] = _dumper(type(obj))
    return dumper(obj)


def _dumper(cls: type[Any]) -> Callable[[Any], list[Any]]:
    """``dump`` for one record type: its fields read by one ``attrgetter`` call (4x the
    speed of a ``getattr`` per field; the wire and the recovery log dump every message),
    then the fields ``_NESTED`` names dumped in turn."""
    names = _FIELDS[cls]  # KeyError: not a record
    tag = cls.tag
    if len(names) < 2:
        one = names[0] if names else None
        get = (lambda obj: ()) if one is None else (lambda obj: (getattr(obj, one),))
    else:
        get = attrgetter(*names)
    nested = _NESTED.get(cls)
    if not nested:
        return lambda obj: [tag, *get(obj)]

    def dump_nested(obj: Any) -> list[Any]:
        out = [tag, *get(obj)]
        for i, kind in nested:
            v = out[i + 1]
            if kind == "list":
                out[i + 1] = [dump(x) for x in v]
            elif v is not None:
                out[i + 1] = dump(v)
        return out

    return dump_nested


def load(data: list[Any] | tuple[Any, ...]) -> Any:
    """Inverse of ``dump``; nested records come back as records (see ``_NESTED``)."""
    try:
        tag = data[0]
        cls = _REGISTRY[tag]
    except (IndexError, KeyError, TypeError):
        raise MessageError(f"not a known message: {data!r:.200}") from None
    names = _FIELDS[cls]
    if not _REQUIRED[cls] <= len(data) - 1 <= len(names):
        expected = str(len(names))
        if _REQUIRED[cls] < len(names):
            expected = f"{_REQUIRED[cls]} to {expected}"
        raise MessageError(
            f"message {tag!r} has {len(data) - 1} fields, expected {expected} ({', '.join(names)})"
        )
    values = list(data[1:])
    nested = _NESTED.get(cls)
    if nested:
        for i, kind in nested:
            v = values[i]
            if kind == "one":
                values[i] = load(v)
            elif kind == "optional":
                values[i] = None if v is None else load(v)
            else:  # "list"
                values[i] = [load(x) for x in v]
    return cls(*values)
