"""A bounded log of task transitions, searchable per key.

Keeping one deque per key would cost ~600 bytes per task, more than the whole budget
of scheduler state per task, so the log is one ring buffer shared by every key (as
dask's ``transition_log``) and ``story`` scans it. Scans only happen when a human or an
``InvalidTransition`` asks, never on the hot path.

The ring is four parallel deques (key, start, finish, event) rather than one deque of
5-tuples: a transition then allocates nothing (the states are interned strings, the
event's ``(stimulus_id, now)`` pair is one tuple shared by every transition it caused),
32 bytes per retained transition instead of 88.
"""

from __future__ import annotations

from collections import deque
from typing import Any

StoryEntry = tuple[Any, str, str, str, float]  # (key, start, finish, stimulus_id, now)


class StoryLog:
    """The last ``maxlen`` transitions of all keys, oldest first."""

    __slots__ = ("keys", "starts", "finishes", "events")

    def __init__(self, maxlen: int = 100_000) -> None:
        self.keys: deque[Any] = deque(maxlen=maxlen)
        self.starts: deque[str] = deque(maxlen=maxlen)
        self.finishes: deque[str] = deque(maxlen=maxlen)
        self.events: deque[tuple[str, float]] = deque(maxlen=maxlen)  # (stimulus_id, now)

    def record(self, key: Any, start: str, finish: str, event: tuple[str, float]) -> None:
        self.keys.append(key)
        self.starts.append(start)
        self.finishes.append(finish)
        self.events.append(event)

    def story(self, *keys: Any) -> list[StoryEntry]:
        """Every retained entry about any of ``keys``, oldest first."""
        wanted = set(keys)
        return [
            (k, s, f, e[0], e[1])
            for k, s, f, e in zip(self.keys, self.starts, self.finishes, self.events, strict=True)
            if k in wanted
        ]

    def __len__(self) -> int:
        return len(self.keys)
