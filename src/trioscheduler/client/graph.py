"""Dask graphs to ``TaskSpec`` lists: the pure step between a collection and the scheduler.

The client turns a dask graph (``dask._task_spec`` nodes, or legacy tuples, a
``HighLevelGraph`` or a dask expression) into the tasks the scheduler receives. Everything
that can be wrong with a graph (a missing dependency, a cycle, an unpicklable argument)
is found here, before anything is sent, and the error names the key.

Each task's ``run_spec`` is made with ``runspec.pack`` so that ``runspec.run`` on the
worker evaluates the node with its dependencies' values: dependencies travel as ``_Dep``
references (a registered reference type), which the worker's unpickler swaps for the
values. Three shortcuts keep the per-task cost low, because a Python scheduler is limited
by per-task overhead:

* a plain ``Task`` whose arguments are references or literals is packed as
  ``func(*args)`` directly (references replaced by ``_Dep``), not as a pickled node:
  about a tenth of the bytes and of the time (87 vs 778 bytes on a delayed tree);
* a function cloudpickle would pickle by value (``__main__``, lambdas, closures) is
  pickled once per conversion and shipped as bytes that the worker loads through a
  small cache, instead of being re-pickled for every one of thousands of tasks;
* a task made only of builtin values, references and functions found by name is written
  by one reused standard pickler in ``runspec``'s format (cloudpickle's per-object hooks
  would have nothing to do for it); anything else goes through ``runspec.pack``. The
  commonest such task, a function applied to references and small atoms (a delayed
  tree's ``add(x, y)``), is written opcode by opcode around its function's opcodes,
  pickled once per graph (``_direct``).

This module does no I/O; it reads ``dask.get_annotations()`` (a context variable), so
call it in the user's thread, not inside the event loop's thread.
"""

from __future__ import annotations

import functools
import io
import pickle
import struct
import sys
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import cloudpickle
from dask._task_spec import (
    Alias,
    DataNode,
    GraphNode,
    Task,
    TaskRef,
    convert_legacy_graph,
)
from dask.base import get_annotations
from dask.order import order as dask_order

from trioscheduler.core.messages import Key, TaskSpec
from trioscheduler.errors import TrioSchedulerError
from trioscheduler.wire import runspec

__all__ = [
    "Annotations",
    "CycleError",
    "GraphError",
    "MissingDependencyError",
    "graph_to_tasks",
    "materialize",
]

Annotations = dict[str, dict[Key, Any]]
"""Per-key annotations by type, as dask expressions report them: ``{"retries": {key: 2}}``."""


class GraphError(TrioSchedulerError, ValueError):
    """The graph cannot be computed as given; nothing was sent."""


class MissingDependencyError(GraphError):
    """A task depends on a key that is neither in the graph nor on the cluster."""

    def __init__(self, key: Key, dependency: Key) -> None:
        self.key = key
        self.dependency = dependency
        super().__init__(
            f"task {key!r} depends on {dependency!r}, which is neither in the graph nor "
            f"held on the cluster; add it to the graph or keep a future for it"
        )


class CycleError(GraphError):
    """The graph has a cycle, so no task on it could ever start."""

    def __init__(self, cycle: list[Key]) -> None:
        self.cycle = cycle
        path = " -> ".join(repr(k) for k in cycle)
        super().__init__(f"cycle in the graph at key {cycle[0]!r}: {path}; break the cycle")


# --------------------------------------------------------------------------------------
# What the worker runs
# --------------------------------------------------------------------------------------


class _Dep:
    """A dependency inside a run spec: pickled as a reference to ``key``, never by value."""

    __slots__ = ("key",)

    def __init__(self, key: Key) -> None:
        self.key = key

    def __repr__(self) -> str:
        return f"_Dep({self.key!r})"


runspec.register_reference(_Dep, lambda dep: dep.key)


def _execute_node(node: GraphNode, values: dict[Key, Any]) -> Any:
    """Evaluate a graph node; ``values`` arrived as references and now holds the values."""
    return node(values)


def _value(x: Any) -> Any:
    """Run spec of a data node or an alias: the value itself."""
    return x


@functools.lru_cache(maxsize=256)
def _load_function(payload: bytes) -> Callable[..., Any]:
    """A by-value function, unpickled once per worker process rather than once per task."""
    func: Callable[..., Any] = pickle.loads(payload)
    return func


class _ByValueFunction:
    """Ships a by-value function as its (cached) cloudpickle bytes."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __reduce__(self) -> tuple[Any, ...]:
        return (_load_function, (self.payload,))


def _pickled_by_reference(func: Any) -> bool:
    """Would pickle find ``func`` by its module and name on the worker?"""
    if isinstance(func, functools.partial | types.BuiltinFunctionType | type):
        return True  # partials recurse through pickle normally; builtins/types by name
    if not isinstance(func, types.FunctionType):
        return True  # callable instances: pickled as objects, nothing to cache
    module = getattr(func, "__module__", None)
    if module is None or module == "__main__" or module in _by_value_modules():
        return False
    obj: Any = sys.modules.get(module)
    for part in func.__qualname__.split("."):
        obj = getattr(obj, part, None)
    return obj is func


def _by_value_modules() -> set[str]:
    try:
        return set(cloudpickle.list_registry_pickle_by_value())
    except AttributeError:  # pragma: no cover - very old cloudpickle
        return set()


class _FunctionCache:
    """Per-conversion cache: each by-value function is cloudpickled once.

    Calling it gives ``(what to pickle, plain, body)``: ``plain`` is True when the
    standard pickler would pickle it exactly as cloudpickle does (a module-level function
    or builtin found by name, or an already cloudpickled by-value function); ``body`` is
    then its pickle's opcodes (see ``_function_body``), for ``_direct``.
    """

    __slots__ = ("_by_id", "_keep")

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[Any, bool, bytes | None]] = {}
        self._keep: list[Any] = []  # keeps ids valid for the cache's lifetime

    def __call__(self, func: Any) -> tuple[Any, bool, bytes | None]:
        found = self._by_id.get(id(func))
        if found is None:
            if not _pickled_by_reference(func):
                try:
                    what: Any = _ByValueFunction(cloudpickle.dumps(func, protocol=5))
                    plain = True
                except Exception:
                    what, plain = func, False  # let runspec.pack report it, naming the task
            elif isinstance(func, types.FunctionType):
                what, plain = func, True  # verified: found by module and qualified name
            elif isinstance(func, types.BuiltinFunctionType):
                what, plain = func, isinstance(func.__self__, types.ModuleType | None)
            else:
                what, plain = func, False
            found = (what, plain, _function_body(what) if plain else None)
            self._by_id[id(func)] = found
            self._keep.append(func)
        return found


def _function_body(func: Any) -> bytes | None:
    """``func``'s protocol-5 pickle without its PROTO/FRAME header and STOP, or None.

    A pickle under 64 KiB is one frame, so cutting its header leaves valid opcodes
    (framing is optional in protocol 5).
    """
    try:
        data = pickle.dumps(func, protocol=5)
    except Exception:
        return None
    if len(data) >= 60_000 or data[:3] != b"\x80\x05\x95" or data[-1:] != b".":
        return None
    return data[11:-1]


_TUPLE_OPS = (b")", b"\x85", b"\x86", b"\x87")  # EMPTY_TUPLE, TUPLE1, TUPLE2, TUPLE3
_BINFLOAT = struct.Struct(">d")


def _atom(x: Any) -> bytes | None:
    """Pickle opcodes (no memo) for a str, small int, float, bool, None or tuple of them."""
    t = type(x)
    if t is str:
        data: bytes = x.encode("utf-8", "surrogatepass")
        n = len(data)
        return b"\x8c" + bytes((n,)) + data if n < 256 else b"X" + n.to_bytes(4, "little") + data
    if t is int:
        i: int = x
        if 0 <= i < 256:
            return b"K" + bytes((i,))
        if 0 <= i < 65536:
            return b"M" + i.to_bytes(2, "little")
        if -(2**31) <= i < 2**31:
            return b"J" + i.to_bytes(4, "little", signed=True)
        return None
    if x is None:
        return b"N"
    if t is bool:
        return b"\x88" if x else b"\x89"
    if t is float:
        return b"G" + _BINFLOAT.pack(x)
    if t is tuple:
        parts = [_atom(item) for item in x]
        if None in parts:
            return None
        if len(x) <= 3:
            return b"".join(parts) + _TUPLE_OPS[len(x)]  # type: ignore[arg-type]
        return b"(" + b"".join(parts) + b"t"  # type: ignore[arg-type]
    return None


def _direct(body: bytes, args: list[Any]) -> tuple[bytes, list[Key]] | None:
    """The run spec of ``func(*args)`` written opcode by opcode, or None if it cannot be.

    It unpickles exactly as ``_PlainPickler.pack(func, tuple(args), {})`` does, but the
    function's opcodes are pickled once per graph, not once per task (16k ``add`` calls
    in a tree), and there is no frame header or memo: 16 bytes less per run spec and
    no Python call per pickled object. Arguments may be ``_Dep``s and the atoms of
    ``_atom``; anything else goes through the pickler.
    """
    parts = [b"\x80\x05", body]
    if len(args) > 3:
        parts.append(b"(")  # MARK
    deps: list[Key] = []
    for a in args:
        if type(a) is _Dep:
            key = a.key
            op = _atom(key)
            if op is None:
                return None
            parts.append(op)
            parts.append(b"\x85Q")  # TUPLE1, BINPERSID: the reference (key,)
            if key not in deps:
                deps.append(key)
        else:
            op = _atom(a)
            if op is None:
                return None
            parts.append(op)
    parts.append(_TUPLE_OPS[len(args)] if len(args) <= 3 else b"t")
    parts.append(b"}\x87.")  # EMPTY_DICT (kwargs), TUPLE3 (func, args, kwargs), STOP
    return b"".join(parts), deps


_ATOMS = frozenset({int, float, complex, str, bytes, bool, type(None), _Dep})


def _plain(x: Any) -> bool:
    """Is ``x`` made only of builtin atoms, lists, tuples, dicts and ``_Dep``s?"""
    t = type(x)
    if t in _ATOMS:
        return True
    if t is tuple or t is list:
        return all(map(_plain, x))
    if t is dict:
        return all(type(k) in _ATOMS and _plain(v) for k, v in x.items())
    return False


class _PlainPickler(pickle.Pickler):
    """The C pickler with ``_Dep`` references, for run specs of plain values only.

    It writes what ``runspec.pack`` writes (a pickle of ``(func, args, kwargs)`` whose
    dependencies are persistent ids ``(key,)``) at about half the cost, because it skips
    cloudpickle's per-object hooks; ``_plain`` and ``_FunctionCache`` guarantee there is
    nothing for those hooks to do. One instance is reused for a whole graph.
    """

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        super().__init__(self._buf, protocol=5)
        self._deps: list[Key] = []

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is _Dep:
            key = obj.key
            if key not in self._deps:
                self._deps.append(key)
            return (key,)
        return None

    def pack(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[runspec.RunSpec, list[Key]]:
        buf = self._buf
        buf.seek(0)
        buf.truncate()
        self.clear_memo()
        deps: list[Key] = []
        self._deps = deps
        self.dump((func, args, kwargs))
        return buf.getvalue(), deps


# --------------------------------------------------------------------------------------
# Packing one node
# --------------------------------------------------------------------------------------


def _flat_arg(a: Any) -> tuple[bool, Any]:
    """``(ok, packed)``: ``a`` as a direct argument, or ``ok=False`` if it needs the node."""
    if isinstance(a, TaskRef):
        return True, _Dep(a.key)
    if isinstance(a, GraphNode):
        t = type(a)
        if t is Alias:
            return True, _Dep(a.target)  # type: ignore[attr-defined]
        if t is DataNode:
            return True, a.value  # type: ignore[attr-defined]
        return False, None
    return True, a


class _Packer:
    """Packs the nodes of one graph, sharing the function cache and the plain pickler."""

    __slots__ = ("functions", "plain")

    def __init__(self) -> None:
        self.functions = _FunctionCache()
        self.plain = _PlainPickler()

    def __call__(self, node: GraphNode) -> tuple[runspec.RunSpec, list[Key]]:
        t = type(node)
        if t is Task:
            flat = self._flat_task(node)  # type: ignore[arg-type]
            if flat is not None:
                return flat
        elif t is DataNode:
            return self._pack(_value, True, (node.value,), {})  # type: ignore[attr-defined]
        elif t is Alias:
            return self.plain.pack(_value, (_Dep(node.target),), {})  # type: ignore[attr-defined]
        values = {k: _Dep(k) for k in node.dependencies}
        return runspec.pack(_execute_node, (node, values), {})

    def _flat_task(self, node: Task) -> tuple[runspec.RunSpec, list[Key]] | None:
        args = []
        for a in node.args:
            ok, packed = _flat_arg(a)
            if not ok:
                return None
            args.append(packed)
        kwargs = {}
        for name, a in node.kwargs.items():
            ok, packed = _flat_arg(a)
            if not ok:
                return None
            kwargs[name] = packed
        func, plain, body = self.functions(node.func)
        if body is not None and not kwargs:
            direct = _direct(body, args)
            if direct is not None:
                return direct
        return self._pack(func, plain, tuple(args), kwargs)

    def _pack(
        self, func: Any, plain: bool, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[runspec.RunSpec, list[Key]]:
        if (
            plain
            and (_ATOMS.issuperset(map(type, args)) or _plain(args))
            and (not kwargs or _plain(kwargs))
        ):
            return self.plain.pack(func, args, kwargs)
        return runspec.pack(func, args, kwargs)


# --------------------------------------------------------------------------------------
# Graph in, tasks out
# --------------------------------------------------------------------------------------


def materialize(dsk: Any) -> tuple[dict[Key, GraphNode], Annotations]:
    """A dask graph of any kind as ``({key: GraphNode}, annotations)``.

    Accepts a dask expression (what ``dask.compute`` hands a scheduler), a
    ``HighLevelGraph`` (its layers' ``dask.annotate`` annotations are kept) or a plain
    mapping with ``_task_spec`` nodes or legacy tuple tasks.
    """
    annotations: Annotations = {}
    if hasattr(dsk, "__dask_annotations__") and hasattr(dsk, "__dask_graph__"):
        annotations = {k: dict(v) for k, v in dsk.__dask_annotations__().items()}
        dsk = dsk.__dask_graph__()
    layers = getattr(dsk, "layers", None)
    if layers is not None:  # HighLevelGraph
        for layer in layers.values():
            for name, value in (layer.annotations or {}).items():
                per_key = annotations.setdefault(name, {})
                for k in layer:
                    per_key[k] = value(k) if callable(value) else value
    if all(isinstance(v, GraphNode) for v in dsk.values()):
        return dict(dsk), annotations
    return convert_legacy_graph(dsk), annotations


def graph_to_tasks(
    dsk: Any,
    *,
    keys_wanted: Iterable[Key] | None = None,
    known_keys: Iterable[Key] = (),
    workers: str | Iterable[str] | None = None,
    allow_other_workers: bool | None = None,
    resources: Mapping[str, float] | None = None,
    retries: int | None = None,
    priority: int = 0,
    annotations: Mapping[str, Mapping[Key, Any]] | None = None,
) -> list[TaskSpec]:
    """The ``TaskSpec``s that compute ``keys_wanted`` (default: every key), in topological order.

    Only what ``keys_wanted`` needs is emitted. Keys in ``known_keys`` (already on the
    cluster: persisted or scattered futures) are never emitted; tasks that need them
    simply list them as dependencies. The keyword restrictions apply to every task, and
    so do ``dask.annotate`` annotations active in this thread; per-key annotations of the
    graph's layers (or ``annotations``) take precedence over both, as in dask.

    Raises ``MissingDependencyError`` or ``CycleError`` naming the key, and
    ``runspec.UnpicklableArgumentError`` naming the task's bad argument.
    """
    nodes, found = materialize(dsk)
    per_key: dict[str, dict[Key, Any]] = {k: dict(v) for k, v in found.items()}
    for name, values in (annotations or {}).items():
        per_key.setdefault(name, {}).update(values)
    known = known_keys if isinstance(known_keys, set | frozenset) else set(known_keys)
    wanted = list(nodes) if keys_wanted is None else list(keys_wanted)
    topo, forest = _cull_and_sort(nodes, wanted, known)
    # In a forest (no task feeds two others: tree reductions, chains, independent
    # tasks) dask.order's answer is a depth-first post-order, which ``topo`` already
    # is; dask.order would cost ~1.5 KB per task of transient sets (the peak of the
    # whole computation of a 16k-task tree) and ~0.5 s, so it runs only on other graphs.
    ordering = None if forest else dask_order({k: nodes[k] for k in topo})

    defaults = _global_annotations(workers, allow_other_workers, resources, retries, priority)
    pack = _Packer()
    tasks: list[TaskSpec] = []
    append = tasks.append
    for i, key in enumerate(topo):
        node = nodes[key]
        try:
            run_spec, deps = pack(node)
        except runspec.UnpicklableArgumentError as exc:
            raise runspec.UnpicklableArgumentError(f"task {key!r}: {exc}") from exc
        spec = TaskSpec(key, deps, run_spec, order=i if ordering is None else ordering[key])
        if defaults:
            _apply(spec, defaults, key)
        if per_key:
            _apply(spec, {n: v[key] for n, v in per_key.items() if key in v}, None)
        append(spec)
    return tasks


def _cull_and_sort(
    nodes: Mapping[Key, GraphNode], wanted: list[Key], known: Any
) -> tuple[list[Key], bool]:
    """``(keys needed for wanted, dependencies first; forest)``; missing keys and cycles raise.

    One iterative depth-first walk does culling, validation and the topological sort.
    The keys come in post-order: each task right after its last dependency's subtree,
    siblings in the order of their keys' ``str`` (deterministic across processes).
    ``forest`` is True when no emitted key is a dependency of two emitted tasks, so
    that this post-order is what ``dask.order`` would choose.
    """
    done: set[Key] = set()
    active: set[Key] = set()
    topo: list[Key] = []
    forest = True
    for root in wanted:
        if root in done or root in known:
            continue
        if root in nodes and _holds_own_future(nodes[root], root):
            continue
        if root not in nodes:
            raise GraphError(
                f"key {root!r} was asked for but is neither in the graph nor held on the "
                f"cluster; check the keys passed"
            )
        stack: list[tuple[Key, Any]] = [(root, _children(nodes[root]))]
        active.add(root)
        while stack:
            key, deps = stack[-1]
            for dep in deps:
                if dep in done:
                    forest = False  # a second task depends on dep
                    continue
                if dep in known:
                    continue
                if dep in active:
                    path = [k for k, _ in stack]
                    raise CycleError([*path[path.index(dep) :], dep])
                node = nodes.get(dep)
                if node is None:
                    raise MissingDependencyError(key, dep)
                if type(node) is DataNode and _holds_own_future(node, dep):
                    continue  # a persisted collection's {key: future}: on the cluster
                active.add(dep)
                stack.append((dep, _children(node)))
                break
            else:
                stack.pop()
                active.discard(key)
                done.add(key)
                topo.append(key)
    return topo, forest


def _children(node: GraphNode) -> Iterator[Key]:
    """A node's dependencies in a fixed order (a frozenset's order varies with the hash seed)."""
    deps = node.dependencies
    return iter(deps if len(deps) < 2 else sorted(deps, key=str))


def _holds_own_future(node: GraphNode, key: Key) -> bool:
    """Is ``node`` a future for ``key`` itself (how a persisted collection's graph looks)?

    Such keys are on the cluster even if the caller forgot them in ``known_keys``;
    emitting them would make a task that depends on itself.
    """
    if type(node) is not DataNode:
        return False
    value = node.value
    cls = type(value)
    return (
        hasattr(cls, "add_done_callback")
        and hasattr(cls, "done")
        and getattr(value, "key", None) == key
    )


def _global_annotations(
    workers: str | Iterable[str] | None,
    allow_other_workers: bool | None,
    resources: Mapping[str, float] | None,
    retries: int | None,
    priority: int,
) -> dict[str, Any]:
    """Keyword restrictions merged over the ``dask.annotate`` context (keywords win)."""
    merged: dict[str, Any] = dict(get_annotations())
    if workers:
        merged["workers"] = workers
    if allow_other_workers:
        merged["allow_other_workers"] = True
    if resources:
        merged["resources"] = resources
    if retries:
        merged["retries"] = retries
    if priority:
        merged["priority"] = priority
    return merged


def _apply(spec: TaskSpec, annotations: Mapping[str, Any], key: Key | None) -> None:
    """Set the TaskSpec fields an annotation maps to; ``key`` resolves callable values."""
    for name, value in annotations.items():
        if key is not None and callable(value):
            value = value(key)
        if value is None:
            continue
        if name in ("workers", "restrictions"):
            spec.workers = [value] if isinstance(value, str) else [str(w) for w in value]
        elif name in ("allow_other_workers", "loose_restrictions"):
            spec.allow_other_workers = bool(value)
        elif name == "resources":
            spec.resources = {str(r): float(n) for r, n in dict(value).items()}
        elif name == "retries":
            spec.retries = int(value)
        elif name == "priority":
            spec.priority = value  # any number, higher first, as in dask
