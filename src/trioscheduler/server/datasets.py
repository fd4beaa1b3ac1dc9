"""Published datasets, the scheduler's side: named values kept by the scheduler.

A dataset outlives the client that published it. The client (``client/datasets.py``)
pickles the value with every ``Future`` inside it written as a reference to its key, so
the scheduler stores opaque bytes plus the list of keys: it never unpickles them. It keeps
those keys wanted by a holder of its own, one per dataset (``published-<name>``), exactly
as a client would: the data stays in cluster memory after the publisher disconnects, is
recomputed if a worker dies, and is released when the dataset is unpublished.
``DatasetStore`` is bookkeeping only: it turns publishing into the ordinary
``ClientDesiresKeys``/``RemoveClient`` events of its holders.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trioscheduler.core import messages as m
from trioscheduler.errors import TrioSchedulerError

__all__ = ["DatasetExistsError", "DatasetStore", "holder_id"]


class DatasetExistsError(TrioSchedulerError, KeyError):
    """A dataset of that name is already published (pass ``override=True`` to replace it)."""

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0]) if self.args else ""


def holder_id(name: Any) -> str:
    """The scheduler-side client id that keeps dataset ``name``'s keys wanted."""
    return f"published-{name if isinstance(name, str) else repr(name)}"


class DatasetStore:
    """The scheduler's datasets: ``name -> (bytes, keys)``; events go through ``feed``.

    ``feed(event_type, *fields)`` hands one client event to the scheduler core (the shell
    fills in ``stimulus_id`` and ``now``).
    """

    __slots__ = ("datasets", "feed", "journal")

    def __init__(self, feed: Callable[..., None]) -> None:
        self.datasets: dict[Any, tuple[bytes, list[Any]]] = {}
        self.feed = feed
        # the scheduler's log (``recover_from``): each change as a record, before it is fed
        self.journal: Callable[[list[Any]], None] | None = None

    def restore(self, records: list[Any]) -> None:
        """Redo the journal of a log being recovered (the core replays the holders)."""
        for r in records:
            if r[1] == "dataset-put":
                self.datasets[r[2]] = (r[3], list(r[4]))
            elif r[1] == "dataset-delete":
                self.datasets.pop(r[2], None)

    def holders(self) -> list[str]:
        return [holder_id(name) for name in self.datasets]

    def put(self, items: list[list[Any]], override: bool) -> None:
        """Publish ``[[name, blob, keys], ...]``: all of them, or none if a name exists."""
        if not override:
            taken = [name for name, _, _ in items if name in self.datasets]
            if taken:
                raise DatasetExistsError(
                    f"dataset {taken[0]!r} is already published; unpublish it first, or "
                    "pass override=True to replace it"
                )
        for name, blob, keys in items:
            old = self.datasets.get(name)
            self.datasets[name] = (blob, list(keys))
            if self.journal is not None:
                self.journal(["dataset-put", name, blob, list(keys)])
            holder = holder_id(name)
            if keys:  # wanted before the old keys go: a key in both is never released
                self.feed(m.ClientDesiresKeys, holder, list(keys))
            if old is not None:
                gone = set(old[1]).difference(keys)
                if gone:
                    self.feed(m.ClientReleasesKeys, holder, [k for k in old[1] if k in gone])

    def get(self, name: Any) -> bytes | None:
        entry = self.datasets.get(name)
        return None if entry is None else entry[0]

    def delete(self, name: Any) -> bool:
        entry = self.datasets.pop(name, None)
        if entry is None:
            return False
        if self.journal is not None:
            self.journal(["dataset-delete", name])
        self.feed(m.RemoveClient, holder_id(name))
        return True

    def clear(self) -> None:
        for name in list(self.datasets):
            self.delete(name)

    def names(self) -> list[Any]:
        return sorted(self.datasets, key=str)
