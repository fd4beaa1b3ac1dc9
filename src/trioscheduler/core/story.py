"""A bounded log of task transitions, searchable per key.

Keeping one deque per key would cost ~600 bytes per task, more than the whole budget
of scheduler state per task, so the log is one ring buffer shared by every key (as
dask's ``transition_log``) and ``story`` scans it. Scans only happen when a human or an
``InvalidTransition`` asks, never on the hot path.
"""

from __future__ import annotations

from collections import deque
from typing import Any

StoryEntry = tuple[Any, str, str, str, float]  # (key, start, finish, stimulus_id, now)


class StoryLog:
    """The last ``maxlen`` transitions of all keys, oldest first."""

    __slots__ = ("entries",)

    def __init__(self, maxlen: int = 100_000) -> None:
        self.entries: deque[StoryEntry] = deque(maxlen=maxlen)

    def record(self, key: Any, start: str, finish: str, stimulus_id: str, now: float) -> None:
        self.entries.append((key, start, finish, stimulus_id, now))

    def story(self, *keys: Any) -> list[StoryEntry]:
        """Every retained entry about any of ``keys``, oldest first."""
        if len(keys) == 1:
            (k,) = keys
            return [e for e in self.entries if e[0] == k]
        wanted = set(keys)
        return [e for e in self.entries if e[0] in wanted]

    def __len__(self) -> int:
        return len(self.entries)
