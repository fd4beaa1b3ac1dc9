"""Dask collections on the cluster: what ``Client.compute/persist/get`` and ``futures_of`` need.

The Client stays thin: it asks this module for a graph and the keys to want, converts the
graph with ``graph_to_tasks`` (in the user's thread, so ``dask.annotate`` is seen),
submits the tasks, and hands the futures or values back here to rebuild what the user
expects. The three paths, as in dask::

    g = collections_to_graph(colls)                      # compute
    tasks = graph_to_tasks(g.graph, keys_wanted=g.flat_keys, known_keys=held,
                           annotations=g.annotations, workers=..., ...)
    futures = {k: Future(k) for k in g.flat_keys}
    return g.per_collection(futures)                     # futures, or values if sync

    g = collections_to_graph(colls, persist=True)        # persist
    ... same submission ...
    return g.rebuild(futures)                            # collections backed by futures

    flat = flatten_keys(keys)                            # get (a dask scheduler)
    tasks = graph_to_tasks(dsk, keys_wanted=flat, known_keys=held, ...)
    return repack(keys, dict(zip(flat, gathered_values)))

Compute uses dask's ``FinalizeCompute``, which puts each collection's final step (concat
of array chunks, ...) into the graph, so each computed collection has exactly one result
key and its future's value is the finished result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
from dask._task_spec import GraphNode, TaskRef
from dask.base import collections_to_expr, is_dask_collection
from dask.delayed import Delayed, delayed

from trioscheduler.client.graph import (
    Annotations,
    CycleError,
    GraphError,
    MissingDependencyError,
    graph_to_tasks,
    materialize,
)
from trioscheduler.core.messages import Key

__all__ = [
    "CollectionGraph",
    "CycleError",
    "GraphError",
    "MissingDependencyError",
    "collections_to_graph",
    "flatten_keys",
    "futures_of",
    "graph_to_tasks",
    "is_future",
    "materialize",
    "repack",
]


@dataclass(slots=True)
class CollectionGraph:
    """One merged graph for several collections, and how to map results back to them.

    ``items`` are the user's arguments in order; ``keys[i]`` is ``None`` for an argument
    that is not a dask collection (passed through unchanged), else its result key
    (compute) or its nested ``__dask_keys__`` (persist).
    """

    graph: dict[Key, GraphNode]
    annotations: Annotations
    items: list[Any]
    keys: list[Any]
    persist: bool
    flat_keys: list[Key] = field(default_factory=list)

    def per_collection(self, by_key: Mapping[Key, Any]) -> list[Any]:
        """Each computed collection replaced by ``by_key[its result key]`` (future or value)."""
        if self.persist:
            raise TypeError("per_collection is for compute graphs; use rebuild() after persist")
        return [
            item if k is None else by_key[k] for item, k in zip(self.items, self.keys, strict=True)
        ]

    def rebuild(self, futures: Mapping[Key, Any]) -> list[Any]:
        """Each collection rebuilt on ``futures`` (its keys' futures), via ``__dask_postpersist__``."""
        if not self.persist:
            raise TypeError("rebuild is for persist graphs; use per_collection() after compute")
        out = []
        for item, keys in zip(self.items, self.keys, strict=True):
            if keys is None:
                out.append(item)
                continue
            func, args = item.__dask_postpersist__()
            out.append(func({k: futures[k] for k in flatten_keys(keys)}, *args))
        return out


def collections_to_graph(
    collections: Any,
    *,
    optimize_graph: bool = True,
    persist: bool = False,
    traverse: bool = True,
) -> CollectionGraph:
    """The merged graph of ``collections`` (one or a sequence), as ``dask.compute`` builds it.

    With ``traverse`` (compute only), lists, tuples, sets and dicts among the arguments
    are wrapped in ``dask.delayed``, so collections nested in them are computed too, as
    dask.distributed does.
    """
    items = (
        list(collections)
        if isinstance(collections, list | tuple | set | frozenset)
        else [collections]
    )
    if traverse and not persist:
        items = [
            delayed(a) if isinstance(a, list | set | tuple | dict | Iterator) else a for a in items
        ]
    colls = [a for a in items if is_dask_collection(a)]
    if not colls:
        return CollectionGraph({}, {}, items, [None] * len(items), persist)
    expr: Any = collections_to_expr(colls, optimize_graph and _optimizes(colls))
    if not persist:
        from dask._expr import FinalizeCompute

        finalize: Any = FinalizeCompute  # folds each collection's postcompute into the graph
        expr = finalize(expr)
    expr = expr.optimize()
    coll_keys = expr.__dask_keys__()
    if len(coll_keys) != len(colls):  # pragma: no cover - dask promises one entry each
        raise GraphError(f"dask returned keys for {len(coll_keys)} of {len(colls)} collections")
    graph, annotations = materialize(expr)
    it = iter(coll_keys)
    keys: list[Any] = []
    for a in items:
        if not is_dask_collection(a):
            keys.append(None)
        elif persist:
            keys.append(next(it))
        else:
            (result_key,) = flatten_keys(next(it))  # FinalizeCompute: one key per collection
            keys.append(result_key)
    flat = [k for ks in keys if ks is not None for k in flatten_keys(ks)]
    return CollectionGraph(graph, annotations, items, keys, persist, flat)


def _optimizes(colls: list[Any]) -> bool:
    """Would dask's low-level optimization do more than cull the graph?

    For plain ``Delayed`` objects without ``optimization.fuse.delayed`` it only culls,
    which ``graph_to_tasks`` does anyway; dask's cull copies each of the graph's layers
    (one per delayed call): ~0.7 KB per task of transient memory and ~0.5 s per
    16k tasks, for the same graph.
    """
    return not (
        all(type(c) is Delayed for c in colls)
        and not dask.config.get("optimization.fuse.delayed", False)
    )


def flatten_keys(keys: Any) -> list[Key]:
    """Keys in nested lists (dask's ``__dask_keys__`` shape) as one flat list.

    Tuples are keys, only lists nest.
    """
    if not isinstance(keys, list):
        return [keys]
    out: list[Key] = []
    stack: list[Any] = [iter(keys)]
    while stack:
        for k in stack[-1]:
            if isinstance(k, list):
                stack.append(iter(k))
                break
            out.append(k)
        else:
            stack.pop()
    return out


def repack(keys: Any, values: Mapping[Key, Any]) -> Any:
    """``keys`` (a key or nested lists of keys) with each key replaced by ``values[key]``."""
    if isinstance(keys, list):
        return [repack(k, values) for k in keys]
    return values[keys]


def is_future(x: Any) -> bool:
    """Duck type of a future: a ``key`` plus ``done``/``add_done_callback`` on its class.

    Looked up on the class because dask's ``Delayed`` answers every attribute on the
    instance (``delayed.done`` is another Delayed).
    """
    t = type(x)
    return (
        hasattr(t, "done")
        and hasattr(t, "add_done_callback")
        and not is_dask_collection(x)
        and hasattr(x, "key")
    )


def futures_of(obj: Any, is_future: Callable[[Any], bool] = is_future) -> list[Any]:
    """Futures inside ``obj``: lists, tuples, sets, dicts and dask collections, searched deeply.

    A persisted collection's graph holds its futures (directly, or as arguments of its
    tasks). Each future is listed once, in the order found. Pass ``is_future`` (e.g.
    ``lambda x: isinstance(x, Future)``) to match one type only.
    """
    stack: list[Any] = [obj]
    seen: set[int] = set()
    found: list[Any] = []
    while stack:
        x = stack.pop()
        t = type(x)
        if t is list or t is tuple or t is set or t is frozenset:
            stack.extend(reversed(list(x)))
        elif t is dict:
            stack.extend(reversed(list(x.values())))
        elif is_future(x):
            if id(x) not in seen:
                seen.add(id(x))
                found.append(x)
        elif isinstance(x, GraphNode):
            stack.extend(reversed(list(_node_children(x))))
        elif isinstance(x, TaskRef):
            continue
        elif is_dask_collection(x):
            graph = x.__dask_graph__()
            if graph is not None:
                stack.extend(reversed(list(graph.values())))
    return found


def _node_children(node: GraphNode) -> Iterable[Any]:
    """Objects a graph node carries that may be (or contain) futures."""
    args: Sequence[Any] = getattr(node, "args", ())
    kwargs: Mapping[str, Any] = getattr(node, "kwargs", {})
    yield from args
    yield from kwargs.values()
    if hasattr(node, "value"):  # DataNode
        yield node.value
