"""Record every event a core receives; replay the log to rebuild an identical state.

Because the cores are pure, a state is a function of its constructor arguments and the
events it handled. A ``Recorder`` wraps a fresh ``SchedulerState`` or ``WorkerState``,
keeps ``messages.dump(event)`` of each event before handing it to ``handle`` (so the log
stays msgpack-writable and cannot be changed by the core afterwards), and starts with a
header naming the kind of state and its constructor keyword arguments::

    ["recorder-header", 2, "scheduler" | "worker", {setting: value, ...}, {"version": ...}]
    ["update-graph", ...]            # one dumped event per record
    ["batch", 2]                     # the next 2 events reached one handle() call
    ["task-finished", ...]
    ["add-keys", ...]
    ...

Batch markers matter because the cores make some decisions once per ``handle()`` call
(the worker starts tasks and transfers after the whole batch): a replay that handled a
batch's events one by one could decide differently. ``batches`` regroups the records.

The header carries every setting of the state (its constructor's defaults filled in,
``settings``), so a replay does not depend on the defaults of the code that reads it,
and the version of the code that wrote it. Format 1 headers (the arguments given only,
no version) still replay, and so do records written before their type gained a trailing
field with a default (``records.load`` fills it in).

``replay(log)`` rebuilds the state from such a list. The shells write the same records to
files (``server/event_log.py``: ``Scheduler(record=PATH)``, ``recover_from=PATH``) and
read them back (``event_log.load_log``); files are no business of the core's.
``pack_log``/``unpack_log`` turn records into bytes and back. A log without a header
(older shell files) replays on a ``SchedulerState`` built from ``defaults``.

Replay does not depend on ``PYTHONHASHSEED``: the cores keep no decision on the
iteration order of ``str`` sets (``test_replay_in_a_process_with_another_hash_seed``,
``tests/test_core_determinism.py``).

``snapshot(state)`` is a canonical, comparable picture of a state (sets sorted, records
flattened), used to check that a replay matches the original.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import msgpack

from trioscheduler._version import __version__
from trioscheduler.core import messages
from trioscheduler.core.scheduler import SchedulerState
from trioscheduler.core.worker import WorkerState

HEADER_TAG = "recorder-header"
BATCH_TAG = "batch"
FORMAT_VERSION = 2
_READABLE_FORMATS = (1, 2)
KINDS: dict[str, type[Any]] = {"scheduler": SchedulerState, "worker": WorkerState}

# Every constructor argument of each kind with its default: a header holds them all, so a
# replay never depends on the defaults of the code reading it (tests/test_recorder.py
# checks these against the constructors' signatures).
DEFAULTS: dict[str, dict[str, Any]] = {
    "scheduler": {
        "worker_timeout": 30.0, "allowed_failures": 3, "steal": True, "validate": False,
        "bandwidth": 100e6, "default_duration": 0.5, "story_length": 100_000,
        "worker_saturation": 1.1, "worker_backlog": 0.05, "no_workers_timeout": None,
        "amm_interval": None,
    },
    "worker": {
        "nthreads": 1, "resources": None, "memory_limit": 0, "target": 0.6, "spill": 0.7,
        "pause": 0.8, "write_ahead": 0.1, "transfer_incoming_count_limit": 4,
        "transfer_message_bytes_limit": 50_000_000, "validate": False, "story_limit": 100_000,
        "transfer_incoming_bytes_limit": None, "prefetch": 0, "prefetch_duration": 0.001,
    },
}  # fmt: skip


class ReplayError(ValueError):
    """A log could not be replayed: bad header, unknown kind or unknown event."""


def header(kind: str, kwargs: dict[str, Any]) -> list[Any]:
    """The first record of a log: the state's kind, all its settings (``kwargs`` with the
    constructor's defaults filled in) and the code's version."""
    if kind not in KINDS:
        raise ReplayError(f"unknown state kind {kind!r}; expected one of {sorted(KINDS)}")
    unknown = set(kwargs) - set(DEFAULTS[kind]) - {"address"}
    if unknown:
        raise ReplayError(f"unknown {kind} settings {sorted(unknown)}")
    full = {**DEFAULTS[kind], **kwargs}
    return [HEADER_TAG, FORMAT_VERSION, kind, full, {"version": __version__}]


def header_meta(head: Any) -> dict[str, Any]:
    """The header's fifth field (``{"version": ...}``), empty for format 1."""
    return dict(head[4]) if len(head) > 4 else {}


def _kind_of(state: Any) -> str:
    for kind, cls in KINDS.items():
        if type(state) is cls:
            return kind
    raise TypeError(f"can record a SchedulerState or WorkerState, not {type(state).__name__}")


def _is_fresh(state: Any) -> bool:
    if type(state) is SchedulerState:
        return not state.tasks and not state.workers and not state.clients
    return not state.tasks


class Recorder:
    """A core that remembers its inputs: use it wherever the state's ``handle`` is used.

    Build it from constructor arguments (``Recorder.scheduler(**kw)``,
    ``Recorder.worker(address, **kw)``) or wrap a state that has handled nothing yet,
    passing the keyword arguments it was built with (they go into the header).
    """

    __slots__ = ("state", "log")

    def __init__(self, state: Any, kwargs: dict[str, Any]) -> None:
        kind = _kind_of(state)
        if not _is_fresh(state):
            raise ValueError("Recorder needs a state that has not handled any event yet")
        self.state = state
        self.log: list[list[Any]] = [header(kind, kwargs)]

    @classmethod
    def scheduler(cls, **kwargs: Any) -> Recorder:
        return cls(SchedulerState(**kwargs), kwargs)

    @classmethod
    def worker(cls, address: str, **kwargs: Any) -> Recorder:
        kw = {"address": address, **kwargs}
        return cls(WorkerState(**kw), kw)

    @classmethod
    def resume(cls, log: Iterable[Any]) -> Recorder:
        """The state ``log`` replays to, recording on after it (a scheduler restarted
        from its log: ``core/sim_restart.py``, ``Scheduler(recover_from=)``)."""
        records = list(log)
        self = cls.__new__(cls)
        self.state = replay(records)
        self.log = records
        return self

    def handle(self, *events: Any) -> list[Any]:
        """Log ``events`` (dumped, before the core sees them), then handle them."""
        dump = messages.dump
        if len(events) > 1:
            self.log.append([BATCH_TAG, len(events)])
        self.log.extend(dump(ev) for ev in events)
        result: list[Any] = self.state.handle(*events)
        return result

    @property
    def events(self) -> list[Any]:
        """The recorded events, loaded back into records."""
        return [messages.load(r) for r in self.log[1:] if r[0] != BATCH_TAG]


def split_log(
    log: Iterable[Any], defaults: dict[str, Any] | None = None
) -> tuple[str, dict[str, Any], list[Any]]:
    """``(kind, kwargs, dumped events)`` of a log, with or without a header.

    A log without a header (as the Scheduler shell writes) is a scheduler's, built with
    ``defaults``. A header in the middle (a file appended to by two runs) is an error:
    split such files first.
    """
    records = list(log)
    if records and records[0] and records[0][0] == HEADER_TAG:
        head = records[0]
        if head[1] not in _READABLE_FORMATS or len(head) != 3 + head[1]:
            raise ReplayError(f"unsupported recorder header {head!r:.200}")
        kind, kwargs = head[2], dict(head[3])
        if kind not in KINDS:
            raise ReplayError(f"unknown state kind {kind!r} in the header")
        records = records[1:]
    else:
        kind, kwargs = "scheduler", dict(defaults or {})
    for i, r in enumerate(records):
        if r and r[0] == HEADER_TAG:
            raise ReplayError(f"a second header at record {i + 1}: two runs in one log?")
    return kind, kwargs, records


def batches(records: Iterable[Any]) -> Iterator[list[Any]]:
    """The dumped events of a log (header removed), grouped as ``handle()`` got them."""
    it = iter(records)
    for r in it:
        if r and r[0] == BATCH_TAG:
            group = list(itertools.islice(it, r[1]))
            if len(group) != r[1]:
                raise ReplayError(f"the log ends inside a batch of {r[1]} events")
            yield group
        else:
            yield [r]


def replay(
    log: Iterable[Any],
    *,
    defaults: dict[str, Any] | None = None,
    validate: bool | None = None,
    upto: int | None = None,
) -> Any:
    """Rebuild the state a log describes: construct it, then handle every event.

    ``validate`` overrides the recorded flag (``True`` finds the first event that breaks
    an invariant); ``upto`` stops after that many events (bisecting a bug report).
    """
    kind, kwargs, records = split_log(log, defaults)
    if validate is not None:
        kwargs["validate"] = validate
    state = KINDS[kind](**kwargs)
    load = messages.load
    left = upto
    for group in batches(records):
        if left is not None:
            if left <= 0:
                break
            group = group[:left]
            left -= len(group)
        state.handle(*[load(r) for r in group])
    return state


# ------------------------------------------------------------------------------ msgpack


def pack_log(log: Iterable[Any]) -> bytes:
    """The records as concatenated msgpack objects (the Scheduler shell's file format)."""
    packer = msgpack.Packer(use_bin_type=True)
    return b"".join(packer.pack(r) for r in log)


def unpack_log(data: bytes) -> list[Any]:
    """Records from concatenated msgpack objects.

    msgpack has no tuples: arrays come back as tuples (``use_list=False``) so that
    tuple keys (``("x", 0)``) stay hashable, also as dict keys. ``messages.load``
    accepts tuples wherever a record holds a list.
    """
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, use_list=False)
    unpacker.feed(data)
    return [_header_lists(r) for r in unpacker]


def _header_lists(r: Any) -> Any:
    if r and r[0] == HEADER_TAG and len(r) >= 4:
        return [r[0], r[1], r[2], dict(r[3]), *[dict(x) for x in r[4:]]]
    return r


# ------------------------------------------------------------------------------ snapshots


def _sorted(items: Iterable[Any]) -> list[Any]:
    return sorted(items, key=repr)


def _scheduler_snapshot(s: SchedulerState) -> dict[str, Any]:
    tasks = {
        repr(k): (
            ts.state, _sorted(ts.dependencies), _sorted(ts.dependents), _sorted(ts.who_has),
            _sorted(ts.wanted_by), ts.n_waiting, ts.n_waiters, ts.processing_on, ts.nbytes,
            ts.type_name, ts.retries, ts.priority, ts.suspicious, ts.killed_on, ts.exception,
            ts.exception_text, ts.run_spec,
        )
        for k, ts in s.tasks.items()
    }  # fmt: skip
    workers = {
        a: (
            ws.status, ws.nthreads, _sorted(ws.has_what), sorted(ws.processing.items(), key=repr),
            _sorted(ws.long_running), ws.nbytes, round(ws.occupancy, 9), ws.incoming_steals,
            ws.name, ws.resources, ws.last_seen,
        )
        for a, ws in s.workers.items()
    }  # fmt: skip
    return {
        "tasks": tasks,
        "workers": workers,
        "clients": {c: _sorted(cs.wants) for c, cs in s.clients.items()},
        "steals": {repr(k): (p.victim, p.thief) for k, p in s.steals.items()},
        "idle": list(s.idle),
        "saturated": sorted(s.saturated),
        "unrunnable": _sorted(s.unrunnable),
        "aliases": dict(s.aliases),
        "counts": dict(s.state_counts),
        "generation": s.generation,
        "prefixes": {n: (p.duration_average, p.n_finished) for n, p in s.prefixes.items()},
    }


def _worker_snapshot(w: WorkerState) -> dict[str, Any]:
    tasks = {
        repr(k): (
            ts.state, [d.key for d in ts.dependencies], [d.key for d in ts.dependents],
            _sorted(ts.who_has), ts.nbytes, ts.priority, ts.previous, ts.next, ts.wanted,
            ts.coming_from, ts.spillable, _sorted(d.key for d in ts.waiting_for_data),
        )
        for k, ts in w.tasks.items()
    }  # fmt: skip
    return {
        "tasks": tasks,
        "status": w.status,
        "in_memory": _sorted(w.in_memory),
        "spilled": _sorted(w.spilled),
        "bytes": (w.memory_bytes, w.spilled_bytes, w.managed_bytes, w.writing_bytes),
        "writing": sorted(w.writing.items(), key=repr),
        "lru": list(w._lru),
        "executing": _sorted(t.key for t in w.executing),
        "long_running": _sorted(t.key for t in w.long_running),
        "in_flight": {p: _sorted(t.key for t in b) for p, b in w.in_flight.items()},
        "resources": dict(w.available_resources),
    }


def snapshot(state: Any) -> dict[str, Any]:
    """A canonical picture of ``state`` (or a ``Recorder``'s): equal states, equal dicts."""
    if isinstance(state, Recorder):
        state = state.state
    if type(state) is SchedulerState:
        return _scheduler_snapshot(state)
    if type(state) is WorkerState:
        return _worker_snapshot(state)
    raise TypeError(f"no snapshot for {type(state).__name__}")
