"""The scheduler core driven by events alone: graphs, results, errors, clients.

Every test builds a ``SchedulerState(validate=True)`` (so every invariant is checked
after every event) and compares the effects it returns and the task states.
"""

from __future__ import annotations

import ast
import itertools
import pickle
from pathlib import Path
from typing import Any

import pytest

from trioscheduler.core.errors import InvalidTransition
from trioscheduler.core.messages import (
    FIRE_AND_FORGET,
    AddClient,
    AddWorker,
    CancelAll,
    CancelKeys,
    ClientDesiresKeys,
    ClientReleasesKeys,
    ComputeTask,
    FreeKeys,
    KeyCancelled,
    KeyErred,
    KeyInMemory,
    RemoveClient,
    RemoveWorker,
    RetryKeys,
    TaskErred,
    TaskFinished,
    TaskSpec,
    ToClient,
    ToWorker,
    UpdateData,
    UpdateGraph,
)
from trioscheduler.core.scheduler import SchedulerState, key_prefix

_ids = itertools.count()


def ev(cls: type, *args: Any, now: float = 0.0, **kw: Any) -> Any:
    """An event of type ``cls`` with a fresh stimulus id."""
    return cls(f"{cls.__name__}-{next(_ids)}", now, *args, **kw)


def spec(key: Any, deps: tuple[Any, ...] = (), **kw: Any) -> TaskSpec:
    return TaskSpec(key, list(deps), f"run-{key}".encode(), **kw)


def computes(effects: list[Any]) -> list[tuple[str, Any]]:
    return [
        (e.worker, e.msg.key)
        for e in effects
        if isinstance(e, ToWorker) and isinstance(e.msg, ComputeTask)
    ]


def frees(effects: list[Any]) -> list[tuple[str, list[Any]]]:
    return [
        (e.worker, list(e.msg.keys))
        for e in effects
        if isinstance(e, ToWorker) and isinstance(e.msg, FreeKeys)
    ]


def to_clients(effects: list[Any]) -> list[tuple[str, str, Any]]:
    return [(e.client, type(e.msg).__name__, e.msg.key) for e in effects if isinstance(e, ToClient)]


def states(s: SchedulerState) -> dict[Any, str]:
    return {k: ts.state for k, ts in s.tasks.items()}


def finished(worker: str, key: Any, nbytes: int = 8, **kw: Any) -> TaskFinished:
    return ev(TaskFinished, worker, key, nbytes, "int", **kw)


def erred(worker: str, key: Any, exc: BaseException | None = None) -> TaskErred:
    exc = exc or ValueError(f"boom in {key}")
    return ev(TaskErred, worker, key, pickle.dumps(exc), b"tb", str(exc), "traceback text")


def cluster(*workers: tuple[str, int], **kw: Any) -> SchedulerState:
    s = SchedulerState(validate=True, **kw)
    for addr, nthreads in workers:
        s.handle(ev(AddWorker, addr, nthreads, name=addr.split("/")[-1]))
    return s


A, B, C = "tcp://a", "tcp://b", "tcp://c"


def test_key_prefix() -> None:
    assert key_prefix("inc-abc123") == "inc"
    assert key_prefix("hello-world-1") == "hello-world"
    assert key_prefix(("x-2", 1)) == "x"
    assert key_prefix(b"hello-world-1") == "hello-world"
    assert key_prefix("x-abcdefab") == "x"
    assert key_prefix("ae05086432ca935f6eba409a8ecd4896") == "data"
    assert key_prefix(3) == "Other"


def test_simple_chain() -> None:
    s = cluster((A, 1))
    eff = s.handle(ev(UpdateGraph, "c", [spec("a"), spec("b", ("a",)), spec("c", ("b",))], ["c"]))
    assert computes(eff) == [(A, "a")]
    msg = eff[0].msg
    assert msg.run_spec == b"run-a" and msg.priority == (0, 1, 0)
    assert states(s) == {"a": "processing", "b": "waiting", "c": "waiting"}

    eff = s.handle(finished(A, "a"))
    assert computes(eff) == [(A, "b")]
    assert eff[0].msg.who_has == {"a": [A]} and eff[0].msg.nbytes == {"a": 8}
    eff = s.handle(finished(A, "b"))
    assert computes(eff) == [(A, "c")]
    assert frees(eff) == [(A, ["a"])]  # nobody needs a's data any more
    eff = s.handle(finished(A, "c"))
    assert to_clients(eff) == [("c", "KeyInMemory", "c")]
    assert frees(eff) == [(A, ["b"])]
    assert states(s) == {"a": "released", "b": "released", "c": "memory"}  # lineage kept
    assert list(s.workers[A].has_what) == ["c"]

    eff = s.handle(ev(ClientReleasesKeys, "c", ["c"]))
    assert frees(eff) == [(A, ["c"])]
    assert s.tasks == {}
    assert s.story("a")[-1][:3] == ("a", "released", "forgotten")


def test_fire_and_forget_keys_are_released_once_done() -> None:
    """``fire_and_forget``: the key runs though no future holds it, and is released once
    done (in the same ``handle`` call: a decision of the core, not of its shell)."""
    s = cluster((A, 1))
    s.handle(ev(AddClient, FIRE_AND_FORGET))
    s.handle(ev(UpdateGraph, "c", [spec("shared"), spec("ok"), spec("bad")], ["shared"]))
    s.handle(ev(ClientDesiresKeys, FIRE_AND_FORGET, ["shared", "ok", "bad"]))
    eff = s.handle(finished(A, "ok"))
    assert to_clients(eff) == []  # nobody to tell
    assert frees(eff) == [(A, ["ok"])] and "ok" not in s.tasks
    eff = s.handle(erred(A, "bad"))
    assert to_clients(eff) == [] and "bad" not in s.tasks
    eff = s.handle(finished(A, "shared"))
    assert to_clients(eff) == [("c", "KeyInMemory", "shared")]  # still c's
    assert states(s) == {"shared": "memory"} and s.tasks["shared"].wanted_by == {"c"}


def test_cancel_all_tells_every_client_but_the_requester() -> None:
    """``Client.restart``: every wanted key is cancelled and released; the requester is
    not told (it cancels its own futures), the others hear why."""
    s = cluster((A, 1))
    s.handle(ev(UpdateGraph, "c1", [spec("a"), spec("b", ("a",))], ["b"]))
    s.handle(ev(UpdateGraph, "c2", [spec("x")], ["x", "b"]))
    eff = s.handle(ev(CancelAll, "c1", "restarted"))
    assert sorted(to_clients(eff)) == [("c2", "KeyCancelled", "b"), ("c2", "KeyCancelled", "x")]
    assert all(e.msg.reason == "restarted" for e in eff if isinstance(e, ToClient))
    assert all(not cs.wants for cs in s.clients.values())
    assert all(ts.state in ("released", "forgotten") for ts in s.tasks.values())


def test_diamond() -> None:
    s = cluster((A, 2), (B, 2))
    g = [spec("a"), spec("b", ("a",)), spec("c", ("a",)), spec("d", ("b", "c"))]
    s.handle(ev(UpdateGraph, "c", g, ["d"]))
    eff = s.handle(finished(A, "a", nbytes=1000))
    assert sorted(k for _, k in computes(eff)) == ["b", "c"]
    assert states(s)["d"] == "waiting"
    s.handle(finished(s.tasks["b"].processing_on or "", "b"))
    assert states(s)["a"] == "memory"  # c still needs it
    eff = s.handle(finished(s.tasks["c"].processing_on or "", "c"))
    assert [k for _, k in computes(eff)] == ["d"]
    assert "a" in sum((keys for _, keys in frees(eff)), [])
    eff = s.handle(finished(s.tasks["d"].processing_on or "", "d"))
    assert to_clients(eff) == [("c", "KeyInMemory", "d")]
    assert states(s)["d"] == "memory"


def test_locality_prefers_worker_holding_dependency_bytes() -> None:
    s = cluster((A, 4), (B, 4))
    s.handle(ev(UpdateData, "c", {"big": [B], "small": [A]}, {"big": 10**9, "small": 10}))
    eff = s.handle(ev(UpdateGraph, "c", [spec("f", ("big", "small"))], ["f"]))
    assert computes(eff) == [(B, "f")]


def test_same_key_twice_is_not_recomputed() -> None:
    s = cluster((A, 1))
    s.handle(ev(UpdateGraph, "c1", [spec("x")], ["x"]))
    eff = s.handle(ev(UpdateGraph, "c2", [spec("x")], ["x"]))
    assert computes(eff) == []
    eff = s.handle(finished(A, "x"))
    assert sorted(to_clients(eff)) == [("c1", "KeyInMemory", "x"), ("c2", "KeyInMemory", "x")]
    eff = s.handle(ev(UpdateGraph, "c3", [spec("x")], ["x"]))
    assert computes(eff) == [] and to_clients(eff) == [("c3", "KeyInMemory", "x")]


def test_unknown_dependency_errs_clearly() -> None:
    s = cluster((A, 1))
    eff = s.handle(ev(UpdateGraph, "c", [spec("y", ("ghost",)), spec("z", ("y",))], ["z"]))
    assert computes(eff) == []
    assert states(s) == {"y": "erred", "z": "erred"}
    assert "ghost" in s.tasks["y"].exception_text
    assert s.tasks["z"].exception_blame == "y"
    (client_msg,) = [e.msg for e in eff if isinstance(e, ToClient)]
    assert isinstance(client_msg, KeyErred) and client_msg.key == "z"
    assert "ghost" in str(pickle.loads(client_msg.exception))


def test_depending_on_erred_key_errs() -> None:
    s = cluster((A, 1))
    s.handle(ev(UpdateGraph, "c", [spec("x")], ["x"]))
    s.handle(erred(A, "x"))
    eff = s.handle(ev(UpdateGraph, "c", [spec("y", ("x",))], ["y"]))
    assert states(s)["y"] == "erred"
    assert to_clients(eff) == [("c", "KeyErred", "y")]
    assert s.tasks["y"].exception_text == "boom in x"


def test_retries_then_erred_propagates() -> None:
    s = cluster((A, 1))
    s.handle(ev(UpdateGraph, "c", [spec("x", retries=1), spec("y", ("x",))], ["y"]))
    eff = s.handle(erred(A, "x"))
    assert computes(eff) == [(A, "x")]  # retried
    assert s.tasks["x"].retries == 0
    assert states(s)["x"] == "processing"
    eff = s.handle(erred(A, "x"))
    assert states(s) == {"x": "erred", "y": "erred"}
    (msg,) = [e.msg for e in eff if isinstance(e, ToClient)]
    assert msg.key == "y" and msg.exception_text == "boom in x"
    assert isinstance(pickle.loads(msg.exception), ValueError)
    assert s.tasks["y"].traceback_text == "traceback text"


def test_erred_unwanted_task_is_forgotten_when_released() -> None:
    s = cluster((A, 1))
    s.handle(ev(UpdateGraph, "c", [spec("x"), spec("y", ("x",))], ["y"]))
    s.handle(erred(A, "x"))
    s.handle(ev(ClientReleasesKeys, "c", ["y"]))
    assert s.tasks == {}


def test_client_refcounts() -> None:
    s = cluster((A, 1))
    s.handle(ev(AddClient, "c1"), ev(AddClient, "c2"))
    s.handle(ev(UpdateGraph, "c1", [spec("x")], ["x"]))
    s.handle(ev(ClientDesiresKeys, "c2", ["x"]))
    s.handle(finished(A, "x"))
    assert s.tasks["x"].wanted_by == {"c1", "c2"}
    eff = s.handle(ev(ClientReleasesKeys, "c1", ["x"]))
    assert eff == [] and states(s) == {"x": "memory"}
    eff = s.handle(ev(ClientReleasesKeys, "c1", ["x"]))  # twice: no effect
    assert eff == []
    eff = s.handle(ev(RemoveClient, "c2"))
    assert frees(eff) == [(A, ["x"])]
    assert s.tasks == {} and "c2" not in s.clients


def test_release_while_processing_frees_on_worker() -> None:
    s = cluster((A, 1))
    s.handle(ev(UpdateGraph, "c", [spec("x"), spec("y", ("x",))], ["y"]))
    eff = s.handle(ev(ClientReleasesKeys, "c", ["y"]))
    assert frees(eff) == [(A, ["x"])]
    assert s.tasks == {}
    eff = s.handle(finished(A, "x"))  # result of a forgotten task
    assert frees(eff) == [(A, ["x"])]
    assert s.tasks == {}


def test_desires_unknown_key() -> None:
    s = cluster((A, 1))
    eff = s.handle(ev(ClientDesiresKeys, "c", ["nope"]))
    assert to_clients(eff) == [("c", "KeyCancelled", "nope")]


def test_cancel_processing_and_dependents() -> None:
    s = cluster((A, 1))
    s.handle(ev(UpdateGraph, "c", [spec("x"), spec("y", ("x",))], ["x", "y"]))
    eff = s.handle(ev(CancelKeys, "c", ["x"]))
    assert sorted(to_clients(eff)) == [("c", "KeyCancelled", "x"), ("c", "KeyCancelled", "y")]
    assert frees(eff) == [(A, ["x"])]
    assert s.tasks == {}


def test_cancel_leaves_other_clients_alone() -> None:
    s = cluster((A, 1))
    s.handle(ev(UpdateGraph, "c1", [spec("x")], ["x"]))
    s.handle(ev(UpdateGraph, "c2", [spec("x")], ["x"]))
    eff = s.handle(ev(CancelKeys, "c1", ["x"]))
    assert to_clients(eff) == [("c1", "KeyCancelled", "x")]
    assert states(s) == {"x": "processing"} and s.tasks["x"].wanted_by == {"c2"}
    eff = s.handle(ev(CancelKeys, "c1", ["x"], force=True))
    assert to_clients(eff) == [("c2", "KeyCancelled", "x")]
    assert s.tasks == {}


def test_retry_erred_and_its_erred_dependencies() -> None:
    s = cluster((A, 1))
    s.handle(ev(UpdateGraph, "c", [spec("x"), spec("y", ("x",))], ["y"]))
    s.handle(erred(A, "x"))
    eff = s.handle(ev(RetryKeys, "c", ["y"]))
    assert computes(eff) == [(A, "x")]
    assert states(s) == {"x": "processing", "y": "waiting"}
    assert s.tasks["y"].exception is None
    s.handle(finished(A, "x"))
    eff = s.handle(finished(A, "y"))
    assert to_clients(eff) == [("c", "KeyInMemory", "y")]


def test_scatter_then_compute_on_it() -> None:
    s = cluster((A, 1), (B, 1))
    eff = s.handle(ev(UpdateData, "c", {"d": [B, "tcp://gone"]}, {"d": 100}))
    assert to_clients(eff) == [("c", "KeyInMemory", "d")]
    assert s.tasks["d"].who_has == {B} and s.workers[B].nbytes == 100
    eff = s.handle(ev(UpdateGraph, "c", [spec("f", ("d",))], ["f"]))
    assert computes(eff) == [(B, "f")]
    s.handle(finished(B, "f"))
    eff = s.handle(ev(ClientReleasesKeys, "c", ["d"]))
    assert frees(eff) == [(B, ["d"])]
    assert "d" in s.tasks and states(s)["d"] == "released"  # lineage of f (no run_spec)


def test_scatter_reported_after_its_holder_restarted_at_the_same_address() -> None:
    """A client scattered to ``A`` and ``B``; ``A``'s process then ended and a new one
    registered at the address before the client's report. The report names each
    holder's run (``incarnations``): the new ``A`` is not counted as a holder, and a
    key that only it would hold is not taken as scattered (the client sends it again)."""
    s = cluster((B, 1))
    s.handle(ev(AddWorker, A, 1, incarnation="a-1"))
    s.handle(ev(RemoveWorker, A, expected=False))
    s.handle(ev(AddWorker, A, 1, incarnation="a-2"))
    runs = {A: "a-1"}
    eff = s.handle(ev(UpdateData, "c", {"d": [A, B], "e": [A]}, {"d": 1, "e": 1}, None, runs))
    assert to_clients(eff) == [("c", "KeyInMemory", "d")]
    assert s.tasks["d"].who_has == {B}
    assert "e" not in s.tasks and not s.workers[A].has_what
    # the same run (a worker that joined again, the same process) is a holder
    eff = s.handle(ev(UpdateData, "c", {"e": [A]}, {"e": 1}, None, {A: "a-2"}))
    assert to_clients(eff) == [("c", "KeyInMemory", "e")]
    assert s.tasks["e"].who_has == {A}


def test_invalid_transition_carries_story() -> None:
    s = cluster((A, 1))
    s.handle(ev(UpdateGraph, "c", [spec("x")], ["x"]))
    s.handle(finished(A, "x"))
    ts = s.tasks["x"]
    with pytest.raises(InvalidTransition) as info:
        s.transition(ts, "processing")
    err = info.value
    assert (err.key, err.start, err.finish) == ("x", "memory", "processing")
    assert [e[1:3] for e in err.story] == [
        ("released", "queued"),  # a root task (no inputs to wait for): to the queue
        ("queued", "processing"),  # handed out from the queue, by priority
        ("processing", "memory"),
    ]
    assert all(len(e) == 5 for e in err.story)


def test_unknown_event_type_is_an_error() -> None:
    s = SchedulerState()
    with pytest.raises(TypeError):
        s.handle(KeyInMemory("x"))


def test_story_is_bounded() -> None:
    s = SchedulerState(story_length=10)
    s.handle(ev(AddWorker, A, 1))
    for i in range(20):
        s.handle(ev(UpdateGraph, "c", [spec(f"t-{i}")], [f"t-{i}"]))
    assert len(s.log) == 10


def test_cancel_unknown_client_is_harmless() -> None:
    s = cluster((A, 1))
    assert s.handle(ev(CancelKeys, "nobody", ["x"])) == []
    assert isinstance(KeyCancelled("x"), KeyCancelled)


def test_wanted_task_with_unknown_dependency_stays_erred_for_client() -> None:
    s = cluster((A, 1))
    eff = s.handle(ev(UpdateGraph, "c", [spec("y", ("ghost",))], ["y"]))
    assert to_clients(eff) == [("c", "KeyErred", "y")]
    assert states(s) == {"y": "erred"}


def test_priority_tuple_user_priority_generation_order() -> None:
    s = cluster((A, 4))
    eff = s.handle(ev(UpdateGraph, "c", [spec("x", priority=5, order=3)], ["x"]))
    assert eff[0].msg.priority == (-5, 1, 3)
    eff = s.handle(ev(UpdateGraph, "c", [spec("y", order=0)], ["y"]))
    assert eff[0].msg.priority == (0, 2, 0)  # a later graph: a later generation


def test_validator_catches_broken_promises() -> None:
    from trioscheduler.core.scheduler_invariants import validate_scheduler

    s = cluster((A, 1))
    s.handle(ev(UpdateGraph, "c", [spec("x")], ["x"]))
    s.handle(finished(A, "x"))
    validate_scheduler(s)
    s.workers[A].has_what.clear()  # a holder that forgot it holds the key
    with pytest.raises(AssertionError, match="has_what"):
        validate_scheduler(s)


def test_same_events_same_effects() -> None:
    """Pure core: feeding the same events twice gives the same effects and stories."""

    def run() -> tuple[list[Any], list[Any]]:
        s = SchedulerState(validate=True)
        evs = [
            AddWorker("1", 0.0, A, 2),
            AddWorker("2", 0.0, B, 1),
            UpdateGraph(
                "3", 1.0, "c", [spec("a"), spec("b", ("a",)), spec("c", ("a",))], ["b", "c"]
            ),
        ]
        out = s.handle(*evs)
        a_on = s.tasks["a"].processing_on
        out += s.handle(TaskFinished("4", 2.0, a_on, "a", 10))
        return out, s.story("a", "b", "c")

    assert run() == run()


def test_task_depending_on_itself_errs() -> None:
    s = cluster((A, 1))
    eff = s.handle(ev(UpdateGraph, "c", [spec("x", ("x",))], ["x"]))
    assert to_clients(eff) == [("c", "KeyErred", "x")]
    assert "cycle" in s.tasks["x"].exception_text


def test_longer_cycle_errs_naming_it() -> None:
    """x -> y -> z -> x (each depends on the next), and w reads x: all err, the error
    names the cycle; nothing waits forever."""
    s = cluster((A, 1))
    specs = [spec("w", ("x",)), spec("x", ("y",)), spec("y", ("z",)), spec("z", ("x",))]
    eff = s.handle(ev(UpdateGraph, "c", specs, ["w", "y"]))
    assert sorted(to_clients(eff)) == [("c", "KeyErred", "w"), ("c", "KeyErred", "y")]
    assert set(states(s).values()) == {"erred"}
    text = s.tasks["y"].exception_text
    assert "cycle: 'y' -> 'z' -> 'x' -> 'y'" in text
    assert "through a cycle" in s.tasks["w"].exception_text  # w erred because of x
    exc = pickle.loads(s.tasks["w"].exception or b"")
    assert "cycle" in str(exc)


def test_dependencies_submitted_after_their_dependents_are_no_cycle() -> None:
    s = cluster((A, 1))
    eff = s.handle(ev(UpdateGraph, "c", [spec("b", ("a",)), spec("a")], ["b"]))
    assert computes(eff) == [(A, "a")]
    assert states(s) == {"a": "processing", "b": "waiting"}


def test_cycle_beside_a_healthy_graph_only_errs_the_cycle() -> None:
    s = cluster((A, 1))
    specs = [spec("p", ("q",)), spec("q", ("p",)), spec("ok")]
    eff = s.handle(ev(UpdateGraph, "c", specs, ["p", "ok"]))
    assert to_clients(eff) == [("c", "KeyErred", "p")]
    assert computes(eff) == [(A, "ok")]


def test_docstring_draws_the_transition_table() -> None:
    """The module docstring's edge list is the table (h11: the docs cannot drift)."""
    from trioscheduler.core import scheduler_transitions as tr

    drawn: set[tuple[str, str]] = set()
    # from the source: a mypyc-compiled module keeps no docstring
    source = Path(tr.__file__).with_name("scheduler_transitions.py").read_text()
    doc = ast.get_docstring(ast.parse(source)) or ""
    block = doc.split("States and the edges between them::")[1].split("\n\n")[1]
    for line in block.splitlines():
        if "->" in line:
            start, _, rest = line.partition("->")
            for finish in rest.split(","):
                drawn.add((start.strip(), finish.split("(")[0].strip()))
    assert drawn == set(tr.TRANSITIONS)


def test_recompute_not_started_once_its_dependent_is_gone() -> None:
    """Regression (both-cores run): a lost key recommended for recompute whose only
    dependent is released in the same event must not run for nobody."""
    s = cluster((A, 1), (B, 1))
    g = [spec("x", workers=[A]), spec("y", ("x",), workers=[A])]
    s.handle(ev(UpdateGraph, "c", g, ["y"]))
    s.handle(finished(A, "x"))
    assert states(s) == {"x": "memory", "y": "processing"}
    eff = s.handle(ev(RemoveWorker, A), ev(ClientReleasesKeys, "c", ["y"]))
    assert s.tasks == {}
    assert computes(eff) == []
