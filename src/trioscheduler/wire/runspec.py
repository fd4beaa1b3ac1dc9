"""Run specs: a task's callable and arguments as bytes, with dependencies as references.

The client packs ``func(*args, **kwargs)`` once, at submit time, so an argument that
cannot be pickled fails there and names itself. Objects whose type is registered with
``register_reference`` (the client's ``Future``) are not pickled: pickle's
``persistent_id`` records them as references to their key, which doubles as the list of
the task's dependencies. On the worker, ``unpack`` resolves each reference to the
dependency's value through pickle's ``persistent_load``, so no Python-level walk over
the arguments happens on either side.

A ``map`` of a function cloudpickle ships by value (``__main__``, lambdas, closures)
with plain arguments makes run specs in two parts (``shared_packer``): the function's
bytes, one object shared by all calls, and each call's arguments.

The scheduler never unpacks a run spec; it only forwards the bytes. Large buffers of
the arguments (pickle protocol 5: numpy, pandas, bytes) stay out of the pickle
(``OutOfBandRunSpec``), so a 500 MB array is never copied on the client and travels
as frames of its own on every hop.
"""

from __future__ import annotations

import functools
import io
import pickle
import weakref
import zlib
from collections.abc import Callable, Mapping
from types import FunctionType
from typing import Any, Final

import cloudpickle

from trioscheduler.errors import TrioSchedulerError

_REFERENCE_TYPES: dict[type[Any], Callable[[Any], Any]] = {}


def register_reference(cls: type[Any], key_of: Callable[[Any], Any]) -> None:
    """Objects of ``cls`` travel inside run specs as references to ``key_of(obj)``."""
    _REFERENCE_TYPES[cls] = key_of


class UnpicklableArgumentError(TrioSchedulerError, TypeError):
    """An argument of a submitted task cannot be serialized."""


class RunSpecLoadError(TrioSchedulerError):
    """A worker could not load a task's run spec (e.g. a module missing on the worker)."""


class OutOfBandRunSpec:
    """A run spec whose large buffers (numpy, pandas, bytes) travel beside the pickle.

    ``pack`` makes one when an argument exposes pickle-5 buffers: the buffers are not
    copied on the client, and every hop (client, scheduler, worker) sends them as
    frames of their own and receives them without copying again; the worker's arrays
    are built on the received buffers. The caller must not change an argument's
    buffer in place until the task has started (as with any zero-copy send).
    """

    __slots__ = ("buffers", "data")

    def __init__(self, data: bytes, buffers: list[Any]) -> None:
        self.data = data
        self.buffers = buffers

    @property
    def nbytes(self) -> int:
        return len(self.data) + sum(memoryview(b).nbytes for b in self.buffers)

    def __reduce__(self) -> tuple[Any, ...]:
        return OutOfBandRunSpec, (self.data, [_out_of_band(b) for b in self.buffers])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OutOfBandRunSpec):
            return NotImplemented
        return self.data == other.data and [memoryview(b).cast("B") for b in self.buffers] == [
            memoryview(b).cast("B") for b in other.buffers
        ]

    __hash__ = None  # type: ignore[assignment]


def _out_of_band(buf: Any) -> pickle.PickleBuffer:
    return buf if isinstance(buf, pickle.PickleBuffer) else pickle.PickleBuffer(buf)


#: A run spec in two parts, ``(function, call)``, made by ``shared_packer``: the function
#: pickled once by value for all calls of a ``map``, and one call's ``(args, kwargs)``.
SharedRunSpec = tuple[bytes, bytes]

#: A run spec: bytes, bytes with out-of-band buffers, or a function shared by many calls.
RunSpec = bytes | OutOfBandRunSpec | SharedRunSpec


class _RefPickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle ships no types
    def __init__(self, file: io.BytesIO, buffers: list[Any] | None = None) -> None:
        super().__init__(
            file, protocol=5, buffer_callback=None if buffers is None else buffers.append
        )
        self.dependencies: list[Any] = []
        self._seen: set[Any] = set()

    def persistent_id(self, obj: Any) -> Any:
        key_of = _REFERENCE_TYPES.get(type(obj))
        if key_of is None:
            return None
        key = key_of(obj)
        if key not in self._seen:
            self._seen.add(key)
            self.dependencies.append(key)
        return (key,)


class _RefUnpickler(pickle.Unpickler):
    def __init__(
        self, file: io.BytesIO, data: Mapping[Any, Any], buffers: list[Any] | None = None
    ) -> None:
        super().__init__(file, buffers=buffers)
        self._data = data

    def persistent_load(self, pid: Any) -> Any:
        return self._data[pid[0]]


#: Out-of-band buffers smaller than this in total are pickled in line (plain bytes).
OUT_OF_BAND_BYTES: Final = 64 * 1024


def _pickle(obj: Any) -> tuple[RunSpec, list[Any]]:
    buf = io.BytesIO()
    buffers: list[pickle.PickleBuffer] = []
    p = _RefPickler(buf, buffers)
    p.dump(obj)
    if not buffers:
        return buf.getvalue(), p.dependencies
    raws: list[Any] = []
    for pb in buffers:
        try:
            raws.append(pb.raw())
        except BufferError:  # not contiguous: one copy
            raws.append(memoryview(pb).tobytes())
    if sum(r.nbytes if isinstance(r, memoryview) else len(r) for r in raws) < OUT_OF_BAND_BYTES:
        buf = io.BytesIO()  # small: one self-contained pickle is cheaper to carry
        p = _RefPickler(buf)
        p.dump(obj)
        return buf.getvalue(), p.dependencies
    return OutOfBandRunSpec(buf.getvalue(), raws), p.dependencies


def pack(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[RunSpec, list[Any]]:
    """``(run_spec, dependencies)`` for ``func(*args, **kwargs)``.

    Raises ``UnpicklableArgumentError`` naming the function or argument that failed.
    """
    try:
        return _pickle((func, args, kwargs))
    except Exception as exc:
        raise _name_culprit(func, args, kwargs, exc) from exc


def plain_packer(func: Callable[..., Any], kwargs: dict[str, Any]) -> Callable[[tuple[Any, ...]], bytes] | None:
    """A faster ``pack`` for many calls of ``func`` whose arguments and ``kwargs`` hold
    no references and no large buffers (the caller checks: ``client.keys.plain``), or
    ``None`` if ``func`` needs cloudpickle.

    The C pickler does what ``_RefPickler`` would (the same bytes, checked here on
    ``func``: a function pickled by reference, or pickled once by value beforehand),
    without cloudpickle's Python-level hooks for every object: ~7x cheaper per task.
    """
    try:
        head = pickle.dumps((func, kwargs), protocol=5)
        if head != cloudpickle.dumps((func, kwargs), protocol=5) or b"__main__" in head:
            return None
    except Exception:
        return None

    def pack_plain(args: tuple[Any, ...]) -> bytes:
        return pickle.dumps((func, args, kwargs), protocol=5)

    return pack_plain


def shared_packer(
    func: Callable[..., Any], kwargs: dict[str, Any]
) -> Callable[[tuple[Any, ...]], SharedRunSpec] | None:
    """``plain_packer``'s counterpart for a function cloudpickle ships by value (defined
    in ``__main__``, a lambda, a closure), or ``None`` if it cannot be pickled.

    The function is pickled once; each call's run spec is ``(function, call)`` with the
    *same* ``function`` bytes object and the call's ``(args, kwargs)`` pickled by the C
    pickler (the same caller's check: no references, no large buffers). A message of
    many such calls (a graph, a batch of ``ComputeTask``) pickles the function once, so
    the scheduler and the workers hold one copy of it per message, not one per task;
    a worker loads it once (``_function``). The function's pickle is compressed so that
    its own ``__main__`` does not show: ``serialize`` sends a batch that reads as
    referring to ``__main__`` the slow way (msgpack, every byte string copied), and that
    would undo the sharing.
    """
    try:
        blob = zlib.compress(cloudpickle.dumps(func, protocol=5))
        pickle.dumps(kwargs, protocol=5)
    except Exception:
        return None

    def pack_shared(args: tuple[Any, ...]) -> SharedRunSpec:
        return blob, pickle.dumps((args, kwargs), protocol=5)

    return pack_shared


@functools.lru_cache(maxsize=64)
def _function(blob: bytes) -> Any:
    """A shared run spec's function, unpickled once per worker (a map's million calls
    hold a few hundred copies of its bytes, one per message, all equal)."""
    return pickle.loads(zlib.decompress(blob))


_PLAIN_FUNCTIONS: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
"""function -> ``plain_packer(function, {})`` works (weakly held: a closure's data is not
kept alive by this)."""


def pack_plain_call(func: Callable[..., Any], args: tuple[Any, ...]) -> bytes | None:
    """``submit``'s fast path: the run spec of ``func(*args)`` (no keywords, ``args``
    plain) as ``pack`` would make it, or ``None`` where ``pack`` is needed. Only plain
    functions qualify (a ``partial`` may hold large buffers, which ``pack`` sends out of
    band); whether one does is remembered per function."""
    if type(func) is not FunctionType:
        return None
    ok = _PLAIN_FUNCTIONS.get(func)
    if ok is None:
        ok = _PLAIN_FUNCTIONS[func] = plain_packer(func, {}) is not None
    return pickle.dumps((func, args, {}), protocol=5) if ok else None


def _name_culprit(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], exc: Exception
) -> UnpicklableArgumentError:
    parts: list[tuple[str, Any]] = [(f"function {func!r}", func)]
    parts += [(f"positional argument {i} ({a!r:.80})", a) for i, a in enumerate(args)]
    parts += [(f"keyword argument {k!r} ({v!r:.80})", v) for k, v in kwargs.items()]
    for label, value in parts:
        try:
            _pickle(value)
        except Exception as inner:
            return UnpicklableArgumentError(
                f"cannot serialize {label} of task {getattr(func, '__name__', func)!r}: "
                f"{type(inner).__name__}: {inner}"
            )
    return UnpicklableArgumentError(f"cannot serialize task {func!r}: {type(exc).__name__}: {exc}")


def unpack(run_spec: RunSpec, data: Mapping[Any, Any]) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """Load a run spec, resolving dependency references from ``data`` (key -> value)."""
    try:
        if isinstance(run_spec, tuple):
            blob, call = run_spec
            func = _function(blob)
            args, kwargs = _RefUnpickler(io.BytesIO(call), data).load()
        elif isinstance(run_spec, OutOfBandRunSpec):
            loader = _RefUnpickler(io.BytesIO(run_spec.data), data, run_spec.buffers)
            func, args, kwargs = loader.load()
        else:
            loader = _RefUnpickler(io.BytesIO(run_spec), data)
            func, args, kwargs = loader.load()
    except KeyError as exc:
        raise RunSpecLoadError(f"dependency {exc.args[0]!r} of the task is not in memory here") from None
    except Exception as exc:
        raise _load_error(exc) from exc
    return func, args, kwargs


def unpack_alone(run_spec: RunSpec, data: Mapping[Any, Any]) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """``unpack`` for a task without dependencies: its run spec refers to no key, so a
    plain run spec is loaded by ``pickle.loads``, without a ``_RefUnpickler`` (whose
    Python subclass costs more than loading a small spec: 2.2 -> 0.9 us)."""
    if type(run_spec) is not bytes:
        return unpack(run_spec, data)
    try:
        func, args, kwargs = pickle.loads(run_spec)
    except pickle.UnpicklingError as exc:
        if "persistent" in str(exc):  # a reference after all (not made by our clients)
            return unpack(run_spec, data)
        raise _load_error(exc) from exc
    except Exception as exc:
        raise _load_error(exc) from exc
    return func, args, kwargs


def _load_error(exc: Exception) -> RunSpecLoadError:
    return RunSpecLoadError(
        f"could not load the task's function or arguments on this worker: "
        f"{type(exc).__name__}: {exc}"
    )


def run(run_spec: RunSpec, data: Mapping[Any, Any]) -> Any:
    """Execute a packed task with its dependencies' values from ``data``."""
    func, args, kwargs = unpack(run_spec, data)
    return func(*args, **kwargs)
