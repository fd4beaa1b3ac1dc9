"""The shared, read-only empty collections that records start with.

Most tasks never need some of their collections; one shared empty instead of a fresh
``set()``/``dict()`` per record saves memory and collector work (see ``TaskRecord``).
A record *replaces* the shared empty on its first insertion, never mutates it.

This module stays interpreted when ``core`` is compiled (mypyc cannot compile a
subclass of ``dict``). Compiled code writes to a ``dict`` directly, past
``_SharedEmpty``'s guards, so the guards catch mistakes in interpreted runs only.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from typing import Any


class _SharedEmpty(dict[Any, None]):
    """The shared empty ordered set: replace it, never mutate it (that fails loudly)."""

    __slots__ = ()

    def __hash__(self) -> int:  # type: ignore[override]  # a dataclass default must be hashable
        return 0

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("the shared empty map is read-only: assign a new dict instead")

    __setitem__ = __delitem__ = pop = popitem = setdefault = update = clear = _refuse


EMPTY: AbstractSet[Any] = frozenset()
"""The shared empty set: a frozenset, so an in-place ``add`` fails loudly."""

EMPTY_MAP: dict[Any, None] = _SharedEmpty()
"""The shared empty insertion-ordered set (a dict of ``None``)."""
