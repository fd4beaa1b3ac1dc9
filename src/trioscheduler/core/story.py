"""A bounded log of task transitions, searchable per key.

Keeping one deque per key would cost ~600 bytes per task, more than the whole budget
of scheduler state per task, so the log is one ring buffer shared by every key (as
dask's ``transition_log``) and ``story`` scans it. Scans only happen when a human or an
``InvalidTransition`` asks, never on the hot path.

The ring is five parallel deques (key, start, finish, stimulus_id, now) rather than one
deque of 5-tuples: a transition then allocates nothing (the states are interned strings,
the stimulus id and time are the event's own objects), 40 bytes per retained transition
instead of 88, and no tracked object that would bring the next garbage collection nearer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

StoryEntry = tuple[Any, str, str, str, float]  # (key, start, finish, stimulus_id, now)


class StoryLog:
    """The last ``maxlen`` transitions of all keys, oldest first."""

    __slots__ = ("keys", "starts", "finishes", "stimuli", "nows")

    def __init__(self, maxlen: int = 100_000) -> None:
        self.keys: deque[Any] = deque(maxlen=maxlen)
        self.starts: deque[str] = deque(maxlen=maxlen)
        self.finishes: deque[str] = deque(maxlen=maxlen)
        self.stimuli: deque[str] = deque(maxlen=maxlen)
        self.nows: deque[float] = deque(maxlen=maxlen)

    def record(self, key: Any, start: str, finish: str, stimulus_id: str, now: float) -> None:
        self.keys.append(key)
        self.starts.append(start)
        self.finishes.append(finish)
        self.stimuli.append(stimulus_id)
        self.nows.append(now)

    def appenders(self) -> tuple[Callable[[Any], None], ...]:
        """The five columns' ``append``s, for hot loops that record without a method call."""
        return (
            self.keys.append, self.starts.append, self.finishes.append, self.stimuli.append,
            self.nows.append,
        )  # fmt: skip

    def tapped_appenders(self) -> tuple[tuple[Callable[[Any], None], ...], tuple[list[Any], ...]]:
        """Appenders that also copy every entry into five lists (the tap), for a shell
        that hands transitions on (plugins) and clears the lists after each event."""
        tap: tuple[list[Any], ...] = ([], [], [], [], [])

        def both(a: Callable[[Any], None], b: Callable[[Any], None]) -> Callable[[Any], None]:
            def append(x: Any) -> None:
                a(x)
                b(x)

            return append

        plain = self.appenders()
        return tuple(both(a, t.append) for a, t in zip(plain, tap, strict=True)), tap

    def story(self, *keys: Any) -> list[StoryEntry]:
        """Every retained entry about any of ``keys``, oldest first."""
        wanted = set(keys)
        columns = (self.keys, self.starts, self.finishes, self.stimuli, self.nows)
        return [e for e in zip(*columns, strict=True) if e[0] in wanted]

    def __len__(self) -> int:
        return len(self.keys)
