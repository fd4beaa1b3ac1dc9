"""The worker core is lean: no ``__dict__`` anywhere (its purity, no I/O, clocks or
randomness, is checked for every core module in ``test_core_scheduler_purity.py``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import trioscheduler.core as core_pkg
from trioscheduler.core import memory_policy, messages
from trioscheduler.core.worker import WorkerState
from trioscheduler.core.worker_task import WorkerTask

FORBIDDEN = {
    "trio", "anyio", "socket", "threading", "time", "random", "asyncio", "os", "pathlib", "io",
}  # fmt: skip
CORE = Path(core_pkg.__file__).parent
WORKER_MODULES = [
    "worker.py", "worker_task.py", "worker_decisions.py", "worker_transitions.py",
    "worker_invariants.py", "memory_policy.py",
]  # fmt: skip


def test_worker_records_have_no_dict() -> None:
    ws = WorkerState("w", memory_limit=100)
    ts = WorkerTask("k", 1)
    th = memory_policy.MemoryThresholds(1, 1, 1, 1)
    for obj in (ws, ts, th):
        assert not hasattr(obj, "__dict__"), type(obj).__name__


@pytest.mark.parametrize("cls", messages.WORKER_EVENTS + messages.ALL_MESSAGES, ids=str)
def test_messages_have_no_dict(cls: type) -> None:
    assert "__slots__" in cls.__dict__ and "__dict__" not in dir(cls), cls.__name__


def test_only_the_transitions_module_assigns_task_state() -> None:
    """h11's rule, checked: ``ts.state = ...`` appears in worker_transitions.py only
    (and in ``WorkerTask.__init__``, which gives a new record its first state)."""
    for name in (
        "worker.py", "worker_task.py", "worker_decisions.py", "worker_invariants.py",
        "memory_policy.py",
    ):  # fmt: skip
        tree = ast.parse((CORE / name).read_text())
        init = next(
            f
            for c in ast.walk(tree)
            if isinstance(c, ast.ClassDef) and c.name == "WorkerTask"
            for f in c.body
            if isinstance(f, ast.FunctionDef) and f.name == "__init__"
        ) if name == "worker_task.py" else None
        skip = set() if init is None else {id(n) for n in ast.walk(init)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign | ast.AugAssign) and id(node) not in skip:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    assert not (
                        isinstance(t, ast.Attribute) and t.attr in ("state", "previous", "next")
                    ), f"core/{name}:{node.lineno} assigns a task's state outside the table"
