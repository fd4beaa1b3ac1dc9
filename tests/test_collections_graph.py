"""Dask collections become TaskSpecs that compute what dask's own scheduler computes.

The evaluator below does what a worker does with a task (``runspec.run`` on the run spec,
given its dependencies' values) in the order a scheduler may pick: lowest ``order`` among
the tasks whose listed dependencies are done. A dependency missing from a TaskSpec's list
therefore fails here as it would on a cluster.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import operator
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from dask import delayed
from dask._task_spec import TaskRef

from trioscheduler.client.collections import (
    CycleError,
    GraphError,
    MissingDependencyError,
    collections_to_graph,
    flatten_keys,
    futures_of,
    graph_to_tasks,
    repack,
)
from trioscheduler.core.messages import TaskSpec
from trioscheduler.wire import runspec


def evaluate(tasks: Iterable[TaskSpec], memory: Mapping[Any, Any] = ()) -> dict[Any, Any]:
    """Run every task as a worker would; ``memory`` holds keys already on the cluster."""
    data = dict(memory)
    pending = {t.key: t for t in tasks}
    waiting = {k: {d for d in t.dependencies if d not in data} for k, t in pending.items()}
    dependents: dict[Any, list[Any]] = {}
    for k, deps in waiting.items():
        for d in deps:
            assert d in pending, f"{k!r} depends on {d!r}, which no task makes"
            dependents.setdefault(d, []).append(k)
    ready = [(pending[k].order, i, k) for i, (k, deps) in enumerate(waiting.items()) if not deps]
    heapq.heapify(ready)
    n = 0
    while ready:
        _, _, key = heapq.heappop(ready)
        spec = pending[key]
        assert spec.run_spec is not None
        data[key] = runspec.run(spec.run_spec, {d: data[d] for d in spec.dependencies})
        n += 1
        for dep in dependents.get(key, ()):
            waiting[dep].discard(key)
            if not waiting[dep]:
                heapq.heappush(ready, (pending[dep].order, n, dep))
    assert n == len(pending), "some tasks never became ready"
    return data


def compute_locally(*collections: Any, memory: Mapping[Any, Any] = ()) -> list[Any]:
    """What ``Client.compute(..., sync=True)`` will do, with the evaluator as the cluster."""
    g = collections_to_graph(list(collections))
    tasks = graph_to_tasks(
        g.graph, keys_wanted=g.flat_keys, known_keys=set(memory), annotations=g.annotations
    )
    data = evaluate(tasks, memory)
    return g.per_collection(data)


def local_get(dsk: Any, keys: Any, **kwargs: Any) -> Any:
    """``Client.get`` with the evaluator as the cluster: usable as ``scheduler=``."""
    flat = flatten_keys(keys)
    data = evaluate(graph_to_tasks(dsk, keys_wanted=flat))
    return repack(keys, data)


def inc(x: int) -> int:
    return x + 1


# --------------------------------------------------------------------------------------
# Collections compute to dask's results
# --------------------------------------------------------------------------------------


def test_delayed_tree_with_local_functions_matches_dask() -> None:
    def add(a: int, b: int) -> int:  # defined here: pickled by value
        return a + b

    parts = [delayed(lambda i: i * i)(i) for i in range(20)]
    while len(parts) > 1:
        parts = [delayed(add)(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)] + (
            parts[-1:] if len(parts) % 2 else []
        )
    total = parts[0]
    both = delayed(dict)(total=total, pair=[total, delayed(inc)(total)])
    (expected,) = dask.compute(both, scheduler="sync")
    assert compute_locally(both) == [expected]
    assert expected["total"] == sum(i * i for i in range(20))


def test_array_expression_matches_dask() -> None:
    x = da.random.RandomState(0).random_sample((12, 12), chunks=(4, 5))
    y = (x + x.T).mean()
    z = (x @ x.T)[::2].sum(axis=0)
    (ry, rz) = compute_locally(y, z)
    ey, ez = dask.compute(y, z, scheduler="sync")
    assert ry == pytest.approx(ey)
    np.testing.assert_allclose(rz, ez)


def test_dataframe_groupby_sum_matches_dask() -> None:
    pdf = pd.DataFrame({"g": [i % 3 for i in range(40)], "v": range(40)})
    df = dd.from_pandas(pdf, npartitions=4)
    s = df.groupby("g").v.sum()
    (result,) = compute_locally(s)
    pd.testing.assert_series_equal(result, s.compute(scheduler="sync"))
    pd.testing.assert_series_equal(result, pdf.groupby("g").v.sum())


def test_bag_matches_dask() -> None:
    b = db.from_sequence(range(30), npartitions=4).map(inc).filter(lambda x: x % 3 == 0)
    total, freq = b.sum(), b.map(lambda x: x % 2).frequencies()
    r_total, r_freq = compute_locally(total, freq)
    e_total, e_freq = dask.compute(total, freq, scheduler="sync")
    assert r_total == e_total
    assert sorted(r_freq) == sorted(e_freq)


def test_arguments_that_are_not_collections_pass_through_and_containers_are_traversed() -> None:
    x = delayed(inc)(1)
    g = collections_to_graph([x, 5, [x, delayed(inc)(x)], {"a": x}])
    data = evaluate(graph_to_tasks(g.graph, keys_wanted=g.flat_keys))
    assert g.per_collection(data) == [2, 5, [2, 3], {"a": 2}]


def test_client_get_shape_as_a_dask_scheduler() -> None:
    x = da.arange(10, chunks=3)
    y = delayed(sum)([1, 2, 3])
    rx, ry = dask.compute(x.sum(), y, scheduler=local_get)
    assert (rx, ry) == (45, 6)
    # nested key lists come back as nested results; tuples are keys, not nesting
    dsk = {("a", 0): 1, ("a", 1): (inc, ("a", 0)), "b": (operator.add, ("a", 0), ("a", 1))}
    assert local_get(dsk, [[("a", 0), ("a", 1)], "b"]) == [[1, 2], 3]
    assert local_get(dsk, "b") == 3


def test_delayed_graphs_are_culled_here_and_fused_by_dask_when_configured() -> None:
    """Plain Delayed objects skip dask's low-level optimization (it would only cull);
    with ``optimization.fuse.delayed`` it runs, as in dask."""
    chunk = (da.arange(10, chunks=5) + 1).to_delayed().ravel()[0]
    g = collections_to_graph(chunk)
    tasks = graph_to_tasks(g.graph, keys_wanted=g.flat_keys)
    assert len(tasks) < len(g.graph)  # the other chunk's tasks are not sent
    assert list(evaluate(tasks)[g.flat_keys[0]]) == [1, 2, 3, 4, 5]

    chain = delayed(inc)(1)
    for _ in range(5):
        chain = delayed(inc)(chain)
    assert len(collections_to_graph(chain).graph) == 6
    with dask.config.set({"optimization.fuse.delayed": True}):
        g = collections_to_graph(chain)
    assert len(g.graph) == 1
    assert evaluate(graph_to_tasks(g.graph, keys_wanted=g.flat_keys))[g.flat_keys[0]] == 7


def test_only_the_wanted_part_of_the_graph_is_emitted() -> None:
    dsk = {"a": 1, "b": (inc, "a"), "c": (inc, "b"), "unrelated": (inc, "a")}
    tasks = graph_to_tasks(dsk, keys_wanted=["b"])
    assert {t.key for t in tasks} == {"a", "b"}
    assert {t.key: t.dependencies for t in tasks} == {"a": [], "b": ["a"]}
    assert evaluate(tasks)["b"] == 2


def test_order_is_dasks_order_and_tasks_come_dependencies_first() -> None:
    x = da.ones((8, 8), chunks=2).sum()
    g = collections_to_graph(x)
    tasks = graph_to_tasks(g.graph, keys_wanted=g.flat_keys)
    assert sorted(t.order for t in tasks) == list(range(len(tasks)))
    position = {t.key: i for i, t in enumerate(tasks)}
    assert all(position[d] < position[t.key] for t in tasks for d in t.dependencies)


def _tree(leaves: int, fan: int) -> Any:
    layer = [delayed(inc)(i) for i in range(leaves)]
    while len(layer) > 1:
        layer = [delayed(_sum)(*layer[i : i + fan]) for i in range(0, len(layer), fan)]
    return layer[0]


def _sum(*xs: int) -> int:
    return sum(xs)


@pytest.mark.parametrize(("leaves", "fan"), [(64, 2), (50, 3), (1, 2)])
def test_a_tree_is_ordered_depth_first_like_dask_order_without_running_it(
    leaves: int, fan: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No task feeds two others: the order is a post-order (each subtree a contiguous
    run of orders ending at its root, as dask.order's), computed without dask.order."""
    import trioscheduler.client.graph as graph_mod

    def refuse(dsk: Any) -> Any:
        raise AssertionError("dask.order ran on a tree")

    monkeypatch.setattr(graph_mod, "dask_order", refuse)
    g = collections_to_graph(_tree(leaves, fan))
    tasks = graph_to_tasks(g.graph, keys_wanted=g.flat_keys)
    assert [t.order for t in tasks] == list(range(len(tasks)))
    first: dict[Any, int] = {}  # lowest order in each task's subtree
    size: dict[Any, int] = {}
    for t in tasks:  # dependencies come first
        first[t.key] = min([t.order, *(first[d] for d in t.dependencies)])
        size[t.key] = 1 + sum(size[d] for d in t.dependencies)
        assert t.order - first[t.key] + 1 == size[t.key], t.key
    assert evaluate(tasks)[g.flat_keys[0]] == leaves * (leaves + 1) // 2
    again = graph_to_tasks(g.graph, keys_wanted=g.flat_keys)
    assert [(t.key, t.order) for t in again] == [(t.key, t.order) for t in tasks]


@pytest.mark.parametrize(
    "args",
    [
        [],
        [1],
        ["dep:a"],
        ["dep:a", "dep:b"],
        ["dep:a", "dep:a", 3, "dep:b"],
        [0, 255, 256, 65535, 65536, -1, -(2**31), 2**31 - 1],
        ["", "x" * 255, "y" * 256, "\u00e9\udc80", None, True, False, 1.5, float("-inf")],
        [("x", 0, 1), (1, 2, 3, 4), (), ("dep",)],
        [2**31],  # from here on: not written directly, the pickler does it
        [-(2**31) - 1],
        [[1, 2]],
        [b"bytes"],
        [1 + 2j],
    ],
)
def test_directly_written_run_specs_unpickle_like_the_picklers(args: list[Any]) -> None:
    """``_direct`` writes opcodes itself; the worker must see what the pickler would give."""
    from trioscheduler.client.graph import _Dep, _direct, _function_body, _PlainPickler

    keys = {"dep:a": "a", "dep:b": ("b", 0, 1)}
    args = [_Dep(keys[a]) if isinstance(a, str) and a in keys else a for a in args]
    body = _function_body(_sum)
    assert body is not None
    direct = _direct(body, args)
    expected, deps = _PlainPickler().pack(_sum, tuple(args), {})
    data = {k: f"value of {k}" for k in deps}
    if direct is None:
        assert any(
            type(a) in (list, bytes, complex) or (type(a) is int and not -(2**31) <= a < 2**31)
            for a in args
        )
        return
    run_spec, direct_deps = direct
    assert direct_deps == deps
    assert runspec.unpack(run_spec, data) == runspec.unpack(expected, data)
    assert len(run_spec) < len(expected)


def test_a_shared_dependency_gets_dask_orders_order() -> None:
    x = da.ones((8, 8), chunks=2)
    g = collections_to_graph(x + x.T)  # each chunk of x feeds two tasks
    tasks = graph_to_tasks(g.graph, keys_wanted=g.flat_keys)
    expected = dask.order.order({k: g.graph[k] for k in (t.key for t in tasks)})
    assert {t.key: t.order for t in tasks} == expected


# --------------------------------------------------------------------------------------
# Persisted keys feed later graphs without being recomputed
# --------------------------------------------------------------------------------------


def test_persisted_collection_feeds_a_later_computation_without_recomputing() -> None:
    x = da.random.RandomState(1).random_sample((9, 9), chunks=3)
    g = collections_to_graph(x * 2, persist=True)
    tasks = graph_to_tasks(g.graph, keys_wanted=g.flat_keys)
    memory = {k: v for k, v in evaluate(tasks).items() if k in set(g.flat_keys)}
    # the cluster now holds only the persisted chunks; futures stand in as dask TaskRefs
    (persisted,) = g.rebuild({k: TaskRef(k) for k in g.flat_keys})
    later = (persisted + 1).sum()
    g2 = collections_to_graph(later)
    tasks2 = graph_to_tasks(g2.graph, keys_wanted=g2.flat_keys, known_keys=set(memory))
    assert not {t.key for t in tasks2} & set(memory)
    assert set(memory) <= {d for t in tasks2 for d in t.dependencies}
    (result,) = g2.per_collection(evaluate(tasks2, memory))
    assert result == pytest.approx(((x * 2 + 1).sum()).compute(scheduler="sync"))


def test_known_keys_inside_the_graph_are_not_reemitted() -> None:
    a = delayed(inc)(1, dask_key_name="a")
    b = delayed(inc)(a, dask_key_name="b")
    tasks = graph_to_tasks(dict(b.__dask_graph__()), keys_wanted=["b"], known_keys={"a"})
    assert [(t.key, t.dependencies) for t in tasks] == [("b", ["a"])]
    assert evaluate(tasks, {"a": 41})["b"] == 42


# --------------------------------------------------------------------------------------
# Annotations and keywords become TaskSpec fields
# --------------------------------------------------------------------------------------


def test_dask_annotate_sets_restrictions_retries_and_priority() -> None:
    with dask.annotate(
        workers=["alice"], resources={"GPU": 1}, retries=2, priority=7, allow_other_workers=True
    ):
        a = delayed(inc)(1, dask_key_name="a")
    b = delayed(inc)(a, dask_key_name="b")
    g = collections_to_graph(b, optimize_graph=False)
    tasks = {
        t.key: t
        for t in graph_to_tasks(
            g.graph, keys_wanted=g.flat_keys, annotations=g.annotations, workers="bob", retries=1
        )
    }
    a_spec, b_spec = tasks["a"], tasks["b"]
    assert (a_spec.workers, a_spec.resources, a_spec.retries, a_spec.priority) == (
        ["alice"],
        {"GPU": 1.0},
        2,
        7,
    )
    assert a_spec.allow_other_workers is True
    # keywords apply where the graph says nothing
    assert (b_spec.workers, b_spec.retries, b_spec.priority, b_spec.resources) == (
        ["bob"],
        1,
        0,
        None,
    )


def test_annotations_active_at_submit_and_callable_ones_apply_per_key() -> None:
    dsk = {("x", 0): 1, ("x", 1): 2, "total": (operator.add, ("x", 0), ("x", 1))}
    with dask.annotate(priority=lambda k: 10 if k == "total" else 1, retries=3):
        tasks = {t.key: t for t in graph_to_tasks(dsk)}
    assert {k: t.priority for k, t in tasks.items()} == {("x", 0): 1, ("x", 1): 1, "total": 10}
    assert {t.retries for t in tasks.values()} == {3}
    assert all(t.workers is None for t in tasks.values())


def test_array_layer_annotations_reach_every_chunk() -> None:
    with dask.annotate(resources={"GPU": 2}):
        x = da.ones((4, 4), chunks=2)
    y = (x + 1).sum()
    g = collections_to_graph(y, optimize_graph=False)
    tasks = graph_to_tasks(g.graph, keys_wanted=g.flat_keys, annotations=g.annotations)
    gpu = {t.key for t in tasks if t.resources == {"GPU": 2.0}}
    assert gpu == {k for k in g.graph if isinstance(k, tuple) and k[0] == x.name}
    assert len(gpu) == 4


# --------------------------------------------------------------------------------------
# Bad graphs fail before anything is sent, naming the key
# --------------------------------------------------------------------------------------


def test_missing_dependency_names_the_task_and_the_key() -> None:
    dsk = {"a": 1, "b": (operator.add, "a", TaskRef("ghost"))}
    with pytest.raises(MissingDependencyError, match="'b' depends on 'ghost'") as info:
        graph_to_tasks(dsk)
    assert isinstance(info.value, ValueError)
    # the same graph is fine once 'ghost' is on the cluster
    (_, b) = graph_to_tasks(dsk, known_keys={"ghost"})
    assert sorted(b.dependencies) == ["a", "ghost"]


def test_cycle_names_the_keys_on_it() -> None:
    dsk = {"start": (inc, "x"), "x": (inc, "y"), "y": (inc, "z"), "z": (inc, "x")}
    with pytest.raises(CycleError, match="cycle in the graph at key 'x'") as info:
        graph_to_tasks(dsk, keys_wanted=["start"])
    assert info.value.cycle == ["x", "y", "z", "x"]
    assert isinstance(info.value, ValueError)


def test_asking_for_a_key_the_graph_lacks_is_an_error() -> None:
    with pytest.raises(GraphError, match="'nope'"):
        graph_to_tasks({"a": 1}, keys_wanted=["nope"])


def test_unpicklable_argument_names_the_task() -> None:
    x = delayed(lambda lock: 1)(threading.Lock(), dask_key_name="locked")
    with pytest.raises(runspec.UnpicklableArgumentError, match="locked"):
        graph_to_tasks(x.__dask_graph__(), keys_wanted=["locked"])


# --------------------------------------------------------------------------------------
# Speed: a 16k-task tree reduction converts quickly
# --------------------------------------------------------------------------------------


def test_sixteen_thousand_task_tree_converts_quickly() -> None:
    def add(a: int, b: int) -> int:  # local: pickled by value, once for all tasks
        return a + b

    n = 8192
    dsk: dict[Any, Any] = {("add", 0, i): (add, i, 1) for i in range(n)}
    level = 0
    while n > 1:
        n //= 2
        for i in range(n):
            dsk[("add", level + 1, i)] = (add, ("add", level, 2 * i), ("add", level, 2 * i + 1))
        level += 1
    start = time.perf_counter()
    tasks = graph_to_tasks(dsk, keys_wanted=[("add", level, 0)])
    elapsed = time.perf_counter() - start
    assert len(tasks) == 16383
    print(
        f"graph_to_tasks: {len(tasks)} tasks in {elapsed:.2f} s, {len(tasks) / elapsed:.0f} tasks/s"
    )
    assert evaluate(tasks)[("add", level, 0)] == sum(range(8192)) + 8192


# --------------------------------------------------------------------------------------
# futures_of, and collections persisted on futures of a type dask does not know
# --------------------------------------------------------------------------------------


class KeyedFuture(concurrent.futures.Future[Any]):
    """A stdlib future with a key: the surface (key, done, add_done_callback) we rely on.

    ``__dask_future__`` is dask's mark for a third-party scheduler's future: dask then
    keeps it out of graph optimizations (fusion) and treats its key as external.
    """

    __dask_future__ = True

    def __init__(self, key: Any) -> None:
        super().__init__()
        self.key = key


def test_futures_of_searches_containers_and_collections_once_each() -> None:
    a, b, c = KeyedFuture("a"), KeyedFuture("b"), KeyedFuture("c")
    x = delayed(inc)(1)
    assert futures_of([a, (b, {"k": [a, c]}), x, 3, "text"]) == [a, b, c]
    g = collections_to_graph([delayed(inc)(1), delayed(inc)(2)], persist=True)
    persisted = g.rebuild({k: KeyedFuture(k) for k in g.flat_keys})
    found = futures_of({"p": persisted})
    assert [f.key for f in found] == g.flat_keys
    # a task holding a future as its argument is searched too
    assert futures_of(delayed(inc)(a)) == [a]
    # a predicate narrows the type
    assert futures_of([a, TaskRef("t")], is_future=lambda f: f is a) == [a]


def test_collection_persisted_on_foreign_futures_is_not_recomputed() -> None:
    x = da.arange(12, chunks=4) * 3
    g = collections_to_graph(x, persist=True)
    memory = {k: v for k, v in evaluate(graph_to_tasks(g.graph)).items() if k in g.flat_keys}
    (persisted,) = g.rebuild({k: KeyedFuture(k) for k in g.flat_keys})
    g2 = collections_to_graph(persisted.sum())
    # dask drops a future's own {key: future} entry; the client names what it holds
    with pytest.raises(MissingDependencyError):
        graph_to_tasks(g2.graph, keys_wanted=g2.flat_keys)
    tasks = graph_to_tasks(g2.graph, keys_wanted=g2.flat_keys, known_keys=set(memory))
    assert not {t.key for t in tasks} & set(memory)
    assert g2.per_collection(evaluate(tasks, memory)) == [3 * sum(range(12))]


def test_high_level_graph_layer_annotations_are_read_for_get() -> None:
    with dask.annotate(retries=4):
        a = delayed(inc)(1, dask_key_name="a")
    b = delayed(inc)(a, dask_key_name="b")
    hlg = b.__dask_graph__()  # what Client.get receives from older dask code
    tasks = {t.key: t for t in graph_to_tasks(hlg, keys_wanted=["b"])}
    assert (tasks["a"].retries, tasks["b"].retries) == (4, 0)
    assert local_get(hlg, ["b"]) == [3]


def test_wanted_keys_already_on_the_cluster_emit_nothing() -> None:
    dsk = {"a": 1, "b": (inc, "a")}
    assert graph_to_tasks(dsk, keys_wanted=["b"], known_keys={"b"}) == []


class Scale:
    """A callable instance, pickled as an object."""

    def __init__(self, factor: int) -> None:
        self.factor = factor

    def __call__(self, x: Any) -> Any:
        return x * self.factor


def test_every_kind_of_callable_and_argument_survives_packing() -> None:
    def combine(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        return (*args, tuple(sorted(kwargs.items())))

    base = delayed(inc)(1, dask_key_name="base")
    parts = {
        "plain": delayed(combine)(base, 2.5, None, b"x", ("t", [1, {"k": 2}]), flag=True),
        "numpy": delayed(np.dot)(np.arange(3), np.full(3, 2)),
        "kwargs_dep": delayed(combine)(k=base),
        "nested": delayed(combine)([base, base], {"in": base}),
        "bound_builtin": delayed("a-b".split)("-"),
        "instance": delayed(Scale(3))(base),
        "lambda": delayed(lambda x, y=1: x + y)(base, y=base),
        "builtin": delayed(max)(base, 7),
    }
    (expected,) = dask.compute(parts, scheduler="sync")
    assert compute_locally(parts) == [expected]
