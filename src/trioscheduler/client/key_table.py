"""The client's futures table: which keys it holds, how many ``Future``s count each.

``client.futures`` (dask's name) maps each key the client holds to its ``KeyState``;
``refcount`` says how many live ``Future`` objects count it. (A key scattered again
right after its release keeps its name, as in dask: a ``FreeKeys`` of the old value
still on its way to a worker names the data update it was sent for, and the worker
keeps a value that came by a newer one; see docs/architecture.md.)

Every rule that keeps these consistent lives here, under one re-entrant lock (a
``Future.__del__`` can run inside a locked section of the same thread, when garbage
collection strikes); the table does no I/O. Its methods say what the caller must send:
``hold`` reports a key new to the table (to be wanted from the scheduler), ``unhold``
the last reference gone (to be released), ``release`` the state dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from trioscheduler.client.futures import KeyState

__all__ = ["KeyTable"]

class KeyTable(Mapping[Any, KeyState]):
    """``key -> KeyState`` of the keys a client holds, with their reference counts."""

    __slots__ = ("_refs", "_states", "lock")

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._states: dict[Any, KeyState] = {}
        self._refs: dict[Any, int] = {}

    # -- Mapping ------------------------------------------------------------------------

    def __getitem__(self, key: Any) -> KeyState:
        return self._states[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._states))

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, key: object) -> bool:
        return key in self._states

    def get(self, key: Any, default: Any = None) -> Any:  # the receive loop's hot path
        return self._states.get(key, default)

    @property
    def refcount(self) -> dict[Any, int]:
        """``{key: live Futures counting it}`` (a copy)."""
        with self.lock:
            return dict(self._refs)

    # -- references ---------------------------------------------------------------------

    def hold(self, key: Any) -> tuple[KeyState, bool]:
        """Count one more ``Future`` of ``key``: its state, and whether the key is new."""
        with self.lock:
            st = self._states.get(key)
            new = st is None
            if st is None:
                st = self._states[key] = KeyState(key)
            self._refs[key] = self._refs.get(key, 0) + 1
            return st, new

    def hold_existing(self, key: Any) -> KeyState | None:
        """Count one more ``Future`` of ``key`` if the table has it; else ``None``."""
        with self.lock:
            st = self._states.get(key)
            if st is not None:
                self._refs[key] = self._refs.get(key, 0) + 1
            return st

    def hold_scattered(self, keys: Iterable[Any]) -> dict[Any, KeyState]:
        """Count a ``Future`` for each key this client is scattering (before its values
        leave: see ``transfer.scatter``)."""
        with self.lock:
            return {k: self.hold(k)[0] for k in keys}

    def unhold(self, key: Any) -> bool:
        """One ``Future`` of ``key`` is gone; ``True`` if it was the last one."""
        with self.lock:
            n = self._refs.get(key, 0) - 1
            if n > 0:
                self._refs[key] = n
                return False
            self._refs.pop(key, None)
            return True

    def release(self, key: Any) -> KeyState | None:
        """Drop ``key`` if no ``Future`` counts it (one may have appeared since its last
        ``unhold``): its state, to tell the scheduler, or ``None`` if nothing to do."""
        with self.lock:
            if key in self._refs:
                return None
            return self._states.pop(key, None)

    # -- dropping states (cancel, restart, close) ---------------------------------------

    def drop(self, keys: Iterable[Any]) -> list[KeyState]:
        """Forget the states of ``keys`` (cancelled); the ones that were there."""
        with self.lock:
            popped = [self._states.pop(k, None) for k in keys]
        return [st for st in popped if st is not None]

    def drop_all(self) -> list[KeyState]:
        with self.lock:
            states = list(self._states.values())
            self._states.clear()
        return states

    def snapshot(self) -> dict[Any, KeyState]:
        with self.lock:
            return dict(self._states)

    def drop_unchanged(self, held: Mapping[Any, KeyState]) -> None:
        """Forget the keys of ``held`` whose state is still the one in ``held`` (a key
        submitted again since has a new state and stays)."""
        with self.lock:
            for key, st in held.items():
                if self._states.get(key) is st:
                    del self._states[key]
