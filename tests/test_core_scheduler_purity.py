"""The core's promises about itself: no I/O, clocks or randomness; slotted values."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import pytest

import trioscheduler.core
from trioscheduler.core import messages, scheduler, story
from trioscheduler.core.messages import ALL_MESSAGES

CORE = Path(trioscheduler.core.__file__).parent
# files too: reading and writing logs is the shells' (server/event_log.py)
FORBIDDEN = {
    "trio", "anyio", "socket", "threading", "time", "random", "asyncio", "os", "pathlib", "io",
}  # fmt: skip


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")), ids=lambda p: p.name)
def test_core_module_imports_no_io_clock_or_randomness(path: Path) -> None:
    bad = _imports(path) & FORBIDDEN
    assert not bad, f"{path.name} imports {sorted(bad)}: the core must stay pure"


def _instance(cls: type) -> object:
    """An instance built from placeholder values (an interpreted dataclass does not
    check types; the scheduler's records, compiled by mypyc, do: see RECORDS)."""
    if cls in RECORDS:
        return RECORDS[cls]()
    fields = getattr(cls, "__dataclass_fields__", {})
    required = [f for f in fields.values() if f.init and f.default is f.default_factory]
    return cls(*[None] * len(required))


RECORDS: dict[type, Callable[[], object]] = {
    scheduler.TaskRecord: lambda: scheduler.TaskRecord("k", None, (), scheduler.TaskPrefix("k")),
    scheduler.WorkerRecord: lambda: scheduler.WorkerRecord("tcp://a:1", 1),
    scheduler.ClientRecord: lambda: scheduler.ClientRecord("c"),
    scheduler.TaskPrefix: lambda: scheduler.TaskPrefix("k"),
    scheduler.ErrorInfo: lambda: scheduler.ErrorInfo(b"e", b"t"),
    scheduler.PendingSteal: lambda: scheduler.PendingSteal("tcp://a:1", "tcp://b:1", "s"),
}


@pytest.mark.parametrize("cls", list(ALL_MESSAGES) + list(RECORDS), ids=lambda c: c.__name__)
def test_no_instance_dict(cls: type) -> None:
    assert cls.__dictoffset__ == 0, f"{cls.__name__} instances carry a __dict__"
    obj = _instance(cls)
    assert not hasattr(obj, "__dict__")


def test_state_and_story_are_slotted() -> None:
    assert not hasattr(scheduler.SchedulerState(), "__dict__")
    assert not hasattr(story.StoryLog(), "__dict__")
    assert messages.Tick.__dictoffset__ == 0
