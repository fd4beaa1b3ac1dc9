"""The vocabulary of ``core/coordination.py``: its events (each carrying ``now``, and a
``request`` number where an answer is due) and its effects. Slotted dataclasses, as the
task cores' messages; the shell builds events from request dicts
(``server/coordination.py``) and reads effects back.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Abandon",
    "ClientGone",
    "Confirm",
    "Effect",
    "EventClear",
    "EventIsSet",
    "EventSet",
    "EventWait",
    "Fail",
    "Key",
    "MultiAcquire",
    "MultiRelease",
    "QueueGet",
    "QueuePut",
    "QueueSize",
    "Reply",
    "SemAcquire",
    "SemRelease",
    "SemValue",
    "Tick",
    "UnwantKeys",
    "VarDelete",
    "VarGet",
    "VarSet",
    "WantKeys",
    "WorkerGone",
]

Key = Hashable


# -- events -----------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class SemAcquire:
    """Take one lease of semaphore ``name`` (created with ``max_leases`` on first use)."""

    now: float
    request: int
    owner: str
    worker: str | None
    name: str
    max_leases: int
    lease: str  # chosen by the asker, unique: the same lease asked twice is granted once
    timeout: float | None  # None: wait for ever; 0: do not wait


@dataclass(slots=True, eq=False)
class SemRelease:
    now: float
    request: int
    name: str
    lease: str


@dataclass(slots=True, eq=False)
class SemValue:
    now: float
    request: int
    name: str


@dataclass(slots=True, eq=False)
class MultiAcquire:
    """Take ``num_locks`` of the locks ``names`` at once, as ``ident`` (one MultiLock)."""

    now: float
    request: int
    owner: str
    worker: str | None
    ident: str
    names: Sequence[str]
    num_locks: int
    timeout: float | None


@dataclass(slots=True, eq=False)
class MultiRelease:
    now: float
    request: int
    ident: str


@dataclass(slots=True, eq=False)
class EventSet:
    now: float
    request: int
    name: str


@dataclass(slots=True, eq=False)
class EventClear:
    now: float
    request: int
    name: str


@dataclass(slots=True, eq=False)
class EventIsSet:
    now: float
    request: int
    name: str


@dataclass(slots=True, eq=False)
class EventWait:
    now: float
    request: int
    owner: str
    worker: str | None
    name: str
    timeout: float | None


@dataclass(slots=True, eq=False)
class VarSet:
    now: float
    request: int
    name: str
    blob: bytes
    keys: Sequence[Key]


@dataclass(slots=True, eq=False)
class VarGet:
    """The value (``[blob, keys, receipt]``), waiting until the variable has one."""

    now: float
    request: int
    owner: str
    worker: str | None
    name: str
    timeout: float | None


@dataclass(slots=True, eq=False)
class VarDelete:
    now: float
    request: int
    name: str


@dataclass(slots=True, eq=False)
class QueuePut:
    now: float
    request: int
    owner: str
    worker: str | None
    name: str
    maxsize: int  # the queue's bound, used when this request creates it (0: unbounded)
    blob: bytes
    keys: Sequence[Key]
    timeout: float | None


@dataclass(slots=True, eq=False)
class QueueGet:
    """One item (``batch=False``), all items there now (``True``), or ``n`` items at once."""

    now: float
    request: int
    owner: str
    worker: str | None
    name: str
    maxsize: int
    batch: bool | int
    timeout: float | None


@dataclass(slots=True, eq=False)
class QueueSize:
    now: float
    request: int
    name: str


@dataclass(slots=True, eq=False)
class Confirm:
    """The getter of a value with futures now holds them itself: close the receipt."""

    now: float
    request: int
    receipt: int


@dataclass(slots=True, eq=False)
class ClientGone:
    now: float
    client: str


@dataclass(slots=True, eq=False)
class WorkerGone:
    now: float
    worker: str


@dataclass(slots=True, eq=False)
class Tick:
    now: float


@dataclass(slots=True, eq=False)
class Abandon:
    """The asker of ``request`` left (its connection closed, its call was cancelled):
    if it still waits, it waits no more; nothing is answered."""

    now: float
    request: int


# -- effects ----------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Reply:
    request: int
    value: Any


@dataclass(slots=True, eq=False)
class Fail:
    """Answer ``request`` with an error: ``kind`` is ``TimeoutError``, ``ValueError``,
    ``RuntimeError`` or ``LookupError``, raised as that type by the client."""

    request: int
    kind: str
    text: str


@dataclass(slots=True, eq=False)
class WantKeys:
    keys: list[Key]


@dataclass(slots=True, eq=False)
class UnwantKeys:
    keys: list[Key]


Effect = Reply | Fail | WantKeys | UnwantKeys
