"""Messages to frames and back: a msgpack header plus out-of-band buffers.

``dumps(msg)`` returns ``[header, *buffers]``. The header is msgpack; everything msgpack
cannot say natively is spelled with an extension type that points at later frames:

* tuples come back as tuples (dask keys like ``("x", 0)``): packed as an array whose
  first item is a marker, turned back into a tuple by the unpacker's ``list_hook``;
* registered records of ``trioscheduler.core.messages`` travel as ``[marker, tag,
  *fields]`` (``messages.dump``) and come back as the same record type;
* large ``bytes``/``bytearray``/``memoryview`` become their own frame (no copy into the
  header);
* any other object is pickled with protocol 5; its ``PickleBuffer``s (numpy arrays,
  pandas blocks) become frames of their own, and functions, lambdas, closures and
  ``__main__`` objects go through cloudpickle.

Plain data pays only for one C-level ``msgpack`` call; only a message whose header
turned out large is packed again part by part (``_Encoder.split``) so that its large
byte strings go out of line. ``loads``
builds arrays straight on the received buffers, so a frame received into a
``bytearray`` is never copied again (only large ``bytes`` are copied once, to give the
receiver an object of the type the sender sent). Buffers under ``OUT_OF_BAND_BYTES``
travel inside the header and arrive as ``bytes`` whatever their type was.
"""

from __future__ import annotations

import copyreg
import io
import operator
import pickle
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Final

import cloudpickle
import msgpack

from trioscheduler.core import messages
from trioscheduler.errors import TrioSchedulerError

Frame = bytes | bytearray | memoryview

#: Buffers at least this large travel as frames of their own instead of inside the header.
OUT_OF_BAND_BYTES: Final = 16 * 1024

# Extension type codes in the header.
_TUPLE: Final = 1  # empty payload: marker heading an array that is a tuple
_RECORD: Final = 2  # empty payload: marker heading [tag, *fields] of a core message
_BYTES: Final = 3  # payload: frame index (u32)
_BYTEARRAY: Final = 4
_MEMORYVIEW: Final = 5
_PICKLE: Final = 6  # payload: first frame index, number of frames (u32, u32)
_BATCH: Final = 7  # empty payload: marker heading a top-level array of messages
_PICKLED_BATCH: Final = 8  # as _PICKLE, of a plain list: the messages of a batch

_U32: Final = struct.Struct("<I")
_U32x2: Final = struct.Struct("<II")
_TUPLE_EXT: Final = msgpack.ExtType(_TUPLE, b"")
_RECORD_EXT: Final = msgpack.ExtType(_RECORD, b"")
_BATCH_EXT: Final = msgpack.ExtType(_BATCH, b"")
_RECORD_TYPES: Final = messages._FIELDS


class SerializationError(TrioSchedulerError, TypeError):
    """An object in a message cannot be serialized (it names the object's type)."""


class DeserializationError(TrioSchedulerError, ValueError):
    """Received frames do not decode to a message (corrupt header, failed unpickle)."""


class _Marker:
    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind


_TUPLE_MARK: Final = _Marker("tuple")
_RECORD_MARK: Final = _Marker("record")
_BATCH_MARK: Final = _Marker("batch")


class Batch(list[Any]):
    """What ``loads`` returns for ``dumps_batch`` frames: the messages, in order."""

    __slots__ = ()


def _pickle(obj: Any, frames: list[Frame]) -> msgpack.ExtType:
    """Pickle ``obj`` into new frames; buffers it exposes are not copied."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        if _needs_cloudpickle(obj):
            raise pickle.PicklingError("defined in __main__ or a local function")
        data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        if b"__main__" in data:  # class or function by reference to the sender's script
            raise pickle.PicklingError("refers to __main__")
    except Exception:
        buffers.clear()
        try:
            data = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        except Exception as e:
            raise SerializationError(
                f"cannot serialize an object of type {type(obj).__qualname__}: {e}"
            ) from e
    first = len(frames)
    frames.append(data)
    for pb in buffers:
        try:
            frames.append(pb.raw())
        except BufferError:  # non-contiguous: one copy is unavoidable
            frames.append(memoryview(pb).tobytes())
    return msgpack.ExtType(_PICKLE, _U32x2.pack(first, len(buffers) + 1))


def _needs_cloudpickle(obj: Any) -> bool:
    module = getattr(obj, "__module__", None) or getattr(type(obj), "__module__", None)
    if module == "__main__":
        return True
    qualname = getattr(obj, "__qualname__", "")
    return isinstance(qualname, str) and "<" in qualname  # <lambda>, <locals>


def _out_of_band(code: int, buf: Frame, frames: list[Frame]) -> msgpack.ExtType:
    if type(buf) is memoryview:
        if not buf.contiguous:
            buf = buf.tobytes()
        elif buf.ndim != 1 or buf.itemsize != 1:
            buf = buf.cast("B")
    frames.append(buf)
    return msgpack.ExtType(code, _U32.pack(len(frames) - 1))


def _default(frames: list[Frame]) -> Callable[[Any], Any]:
    """The packer's hook for everything msgpack does not know natively."""

    def default(obj: Any) -> Any:
        t = type(obj)
        if t is tuple:
            return [_TUPLE_EXT, *obj]
        if t in _RECORD_TYPES:
            return [_RECORD_EXT, *messages.dump(obj)]
        return _pickle(obj, frames)

    return default


class _Encoder:
    """One message's encoding: ``default`` sees everything msgpack does not know natively.

    ``split`` packs a message that turned out large: it assembles the msgpack bytes
    from its parts (a map or array is its header followed by its packed items), sends
    large byte strings out of band, and packs every part that is small whole, in C. So a
    16k-task graph costs a few C-level packs, not a Python walk over every field.
    """

    __slots__ = ("frames", "packer")

    def __init__(self) -> None:
        # The packer's ``default`` must not hold the encoder: a reference cycle would
        # leave every encoder (and its packer's buffer) to the garbage collector, which
        # made a small message's ``dumps`` cost ~4 us instead of ~1. So ``frames`` is
        # never rebound, only mutated. A small first buffer: no mmap for small messages.
        self.frames: list[Frame] = []
        self.packer = msgpack.Packer(
            default=_default(self.frames), strict_types=True, use_bin_type=True, buf_size=4096
        )

    def pack(self, obj: Any) -> bytes:
        """``obj`` packed; if that came out large, packed again by ``split``."""
        t = type(obj)
        if t is bytes or t is bytearray or t is memoryview:
            if _nbytes(obj) >= OUT_OF_BAND_BYTES:
                return self.split(obj)
            return self.packer.pack(obj)  # type: ignore[no-any-return]
        frames = self.frames
        mark = len(frames)
        packed: bytes = self.packer.pack(obj)
        if len(packed) < OUT_OF_BAND_BYTES or t in _PLAIN_SCALARS:
            return packed
        del frames[mark:]  # anything pickled on the way is pickled again below
        return self.split(obj)

    def split(self, obj: Any) -> bytes:
        """``obj`` (known to pack large) packed part by part; big buffers out of band."""
        t = type(obj)
        p = self.packer
        if t is bytes or t is bytearray or t is memoryview:
            code = _BYTES if t is bytes else _BYTEARRAY if t is bytearray else _MEMORYVIEW
            return p.pack(_out_of_band(code, obj, self.frames))  # type: ignore[no-any-return]
        if t is dict:
            parts = [p.pack_map_header(len(obj))]
            for k, v in obj.items():
                parts.append(self.pack(k))
                parts.append(self.pack(v))
        elif t is list:
            parts = [p.pack_array_header(len(obj))]
            parts += [self.pack(x) for x in obj]
        elif t is tuple:
            parts = [p.pack_array_header(len(obj) + 1), p.pack(_TUPLE_EXT)]
            parts += [self.pack(x) for x in obj]
        elif t in _RECORD_TYPES:
            dumped = messages.dump(obj)
            parts = [p.pack_array_header(len(dumped) + 1), p.pack(_RECORD_EXT)]
            parts += [self.pack(x) for x in dumped]
        else:  # a long string, a pickled object: nothing to split
            return p.pack(obj)  # type: ignore[no-any-return]
        return b"".join(parts)


def _nbytes(buf: bytes | bytearray | memoryview) -> int:
    return buf.nbytes if type(buf) is memoryview else len(buf)


def _encode(msg: Any, batch: list[Any] | None = None, split: bool = True) -> list[Frame]:
    enc = _Encoder()
    try:
        if not split:
            header = enc.packer.pack(msg)
        elif batch is None:
            header = enc.pack(msg)
        else:
            p = enc.packer
            # One C-level pack per message (map calls the bound method without a Python
            # frame); only if one came out large is the batch packed again message by
            # message, splitting the large ones (frames pickled on the way are redone).
            parts = list(map(p.pack, batch))
            if parts and max(map(len, parts)) >= OUT_OF_BAND_BYTES:
                enc.frames.clear()
                parts = [enc.pack(m) for m in batch]
            header = b"".join([p.pack_array_header(len(batch) + 1), p.pack(_BATCH_EXT), *parts])
    except SerializationError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise SerializationError(f"cannot serialize message: {e}") from e
    return [header, *enc.frames]


def dumps(msg: Any) -> list[Frame]:
    """``[msgpack header, *out-of-band frames]`` for ``msg``.

    Raises ``SerializationError`` naming the type that could not be serialized.
    """
    return _encode(msg)


_PLAIN_SCALARS: Final = frozenset({str, int, float, bool, type(None)})


#: A batch whose pickle is at least this large is packed with msgpack instead if it holds
#: a string of 64 KiB or more in line (``_has_large_strings``), so that those travel out
#: of band rather than being copied into the pickle. A large batch of small objects stays
#: pickled: a map's graph of 10,000 tasks (~1.2 MB) costs ~1.7 us per task to encode and
#: ~0.9 us to decode pickled, ~10 us and ~4 us packed with msgpack.
PICKLED_BATCH_MAX: Final = 1 << 20


def dumps_batch(msgs: list[Any], walk: bool = True) -> list[Frame]:
    """Frames carrying all of ``msgs`` at once; ``loads`` gives back a ``Batch`` of them.

    A batch of small messages is one ``pickle.dumps`` of their list (protocol 5, buffers
    out of band), referred to from the header by an extension type of its own (the
    receiver wraps the list in a ``Batch``: ~1 us less on each side per write than
    pickling a ``Batch`` object, a list subclass that pickle handles in Python): pickle
    handles tuples, lists and dicts in C, where msgpack needs a Python hook for every
    tuple and record on both sides (3-4x slower for typical messages). A batch that
    pickle cannot take (lambdas, local functions, ``__main__`` objects, memoryviews)
    or that pickles to ``PICKLED_BATCH_MAX`` or more with a string of 64 KiB or more in
    it (not a graph of thousands of small tasks) is packed with msgpack: with
    ``walk=False`` in one call (byte strings inside stay in line), otherwise message by
    message, a message that packs large being split so that its big byte strings go
    out of band.
    """
    frames = _pickle_batch(msgs)
    if frames is not None:
        return frames
    if not walk:
        return _encode([_BATCH_EXT, *msgs], split=False)
    return _encode(None, batch=msgs)


_REDUCERS: dict[type[Any], Callable[[Any], tuple[Any, ...]]] = {}


def _record_reducers() -> dict[type[Any], Callable[[Any], tuple[Any, ...]]]:
    """``cls -> reduce`` for the core records: ``cls(*fields)`` on the other side.

    Faster than the dataclass's own ``__getstate__``/``__setstate__`` (which go through
    ``dataclasses.fields`` for every record), and the same call ``messages.load`` makes.
    """
    if len(_REDUCERS) != len(_RECORD_TYPES):
        for cls, names in list(_RECORD_TYPES.items()):
            if cls not in _REDUCERS:
                _REDUCERS[cls] = _reducer(cls, names, _first_of(cls))
    return _REDUCERS


_EXTENSION_BASE: Final = 0x4000_0000
_seen: set[type[Any]] = set()
"""Record classes pickled in the batch being pickled (cleared by ``_pickle_batch``)."""


def _first_of(cls: type[Any]) -> Callable[..., Any]:
    """What the first record of ``cls`` in a batch is rebuilt with: ``cls(*fields)``
    through a function of this module with a ``copyreg`` extension code (derived from the
    record's tag), or ``cls`` itself if the code is taken.

    A pickle names a class by module and name, and loading it imports the module and
    looks the class up (``find_class``, ~0.9 us per class per pickle, compiled; a lone
    round trip's batches name two each); an extension code is one dict lookup
    (``pickle.loads`` of ``[FreeKeys, ComputeTask]`` 2.9 -> 1.2 us). But a pickler does
    not memoize what it writes as an extension code: every record would pay the lookup
    of its class again (a batch of 64 ``ComputeTask`` 0.64 -> 1.26 us per record). So
    only a class's first record in a batch goes by its code; the others name the class,
    once, and refer to it (``_seen``). The codes live in ``0x40000000-0x7fffffff`` (away
    from the ranges ``copyreg`` reserves) and are the same in every process of a version.
    """
    tag = getattr(cls, "tag", None)
    if type(tag) is not str:
        return cls
    name = f"_new_{tag.replace('-', '_')}"

    def new(*fields: Any) -> Any:
        return cls(*fields)

    new.__name__ = new.__qualname__ = name
    code = _EXTENSION_BASE | (zlib.crc32(tag.encode()) & 0x3FFF_FFFF)
    try:
        copyreg.add_extension(__name__, name, code)
    except ValueError:  # taken (by another name), or the name has another code
        return cls
    globals()[name] = new  # (what the other side's find_class finds, once)
    return new


def _reducer(
    cls: type[Any], names: tuple[str, ...], first: Callable[..., Any]
) -> Callable[[Any], tuple[Any, ...]]:
    seen = _seen
    if len(names) == 1:
        name = names[0]

        def reduce_one(obj: Any) -> tuple[Any, ...]:
            if cls in seen:
                return cls, (getattr(obj, name),)
            seen.add(cls)
            return first, (getattr(obj, name),)

        return reduce_one
    if not names:
        return lambda obj: (cls, ())
    get = operator.attrgetter(*names)

    def reduce(obj: Any) -> tuple[Any, ...]:
        if cls in seen:
            return cls, get(obj)
        seen.add(cls)
        return first, get(obj)

    return reduce


class _BatchPickler(pickle.Pickler):
    """Protocol 5 with the records' reducers; ``dispatch_table`` is set by
    ``_batch_pickler`` (one merged table shared by every batch, not one per batch)."""


_table_sizes = (-1, -1)  # (copyreg's, the records') when the merged table was built
_table_serial = 0  # counts the merged tables built

_Pickling = tuple[io.BytesIO, pickle.Pickler, list[pickle.PickleBuffer], int]
_spares: list[_Pickling] = []
"""Picklers of small batches done, kept for the next (~1 us less than a new pickler and
its file; ``list.pop``/``append`` are atomic, so each is used by one thread at a time)."""
_SPARES: Final = 4
_SPARE_BYTES: Final = 64 * 1024  # a pickler whose file grew larger is not kept


def _batch_pickler() -> _Pickling:
    """A pickler with its file and buffer list: a spare if one is current, else new."""
    global _table_sizes, _table_serial
    sizes = (len(copyreg.dispatch_table), len(_RECORD_TYPES))
    if sizes != _table_sizes:  # a library registered a reducer, or a record type is new
        _BatchPickler.dispatch_table = {**copyreg.dispatch_table, **_record_reducers()}
        _table_sizes = sizes
        _table_serial += 1
    try:
        spare = _spares.pop()
    except IndexError:
        pass
    else:
        if spare[3] == _table_serial:
            return spare
    out = io.BytesIO()
    buffers: list[pickle.PickleBuffer] = []
    pickler = _BatchPickler(out, protocol=5, buffer_callback=buffers.append)
    return out, pickler, buffers, _table_serial


def _pickle_header(count: int) -> bytes:
    """The header of a pickled batch of ``count`` frames (cached: ``msgpack.packb``
    makes a packer with a 256 KiB buffer per call)."""
    header = _PICKLE_HEADERS.get(count)
    if header is None:
        header = msgpack.packb(msgpack.ExtType(_PICKLED_BATCH, _U32x2.pack(0, count)))
        if count < 64:
            _PICKLE_HEADERS[count] = header
    return header


_record_reducers()  # (and the records' extension codes: a process may load before it dumps)

_PICKLE_HEADERS: dict[int, bytes] = {}
_ONE_FRAME_BATCH: Final = _pickle_header(1)  # a pickled batch without out-of-band buffers


def _has_large_strings(data: bytes) -> bool:
    """Does a protocol-5 pickle hold a byte or text string of 64 KiB or more in line?

    The pickler writes its output in frames (opcode ``FRAME``, 0x95, and an 8-byte
    length) of ~64 KiB, except such strings, which it writes between frames: so a walk
    from frame to frame (a few dozen steps for a megabyte) finds them.
    """
    pos, end = 2, len(data)  # after PROTO
    while pos < end:
        if data[pos] != 0x95:
            return True
        pos += 9 + int.from_bytes(data[pos + 1 : pos + 9], "little")
    return False


def _pickle_batch(msgs: list[Any]) -> list[Frame] | None:
    pickling = _batch_pickler()
    out, pickler, buffers, _ = pickling
    _seen.clear()  # (another thread's batch may clear it too: a record then goes by its
    # code or by its class name, both load alike)
    try:
        pickler.dump(msgs if type(msgs) is list else list(msgs))
    except Exception:  # whatever pickle cannot do, the msgpack path does (or reports)
        return None  # (and this pickler is not used again)
    pickler.clear_memo()  # (holds the messages)
    data = out.getvalue()
    frames: list[Frame] = [b"", data]
    if buffers:
        for pb in buffers:
            try:
                frames.append(pb.raw())
            except BufferError:  # non-contiguous: one copy is unavoidable
                frames.append(memoryview(pb).tobytes())
        buffers.clear()
    if len(data) < _SPARE_BYTES and len(_spares) < _SPARES:
        out.seek(0)
        out.truncate()
        _spares.append(pickling)
    if b"__main__" in data:
        return None  # needs cloudpickle
    if len(data) >= PICKLED_BATCH_MAX and _has_large_strings(data):
        return None  # msgpack sends them out of band
    frames[0] = _pickle_header(len(frames) - 1)
    return frames


class _Decoder:
    __slots__ = ("frames",)

    def __init__(self, frames: Sequence[Frame]) -> None:
        self.frames = frames

    def ext_hook(self, code: int, data: bytes) -> Any:
        if code == _TUPLE:
            return _TUPLE_MARK
        if code == _RECORD:
            return _RECORD_MARK
        if code == _BATCH:
            return _BATCH_MARK
        if code == _PICKLE or code == _PICKLED_BATCH:
            first, count = _U32x2.unpack(data)
            frames = self.frames[first + 1 : first + 1 + count]  # frame 0 is the header
            if len(frames) != count or count == 0:
                raise DeserializationError("pickle refers to missing frames")
            obj = pickle.loads(frames[0], buffers=frames[1:])
            if code == _PICKLE:
                return obj
            if type(obj) is not list:
                raise DeserializationError(f"a pickled batch holds a {type(obj).__name__}")
            return Batch(obj)
        (index,) = _U32.unpack(data)
        frame = self.frames[index + 1]
        if code == _BYTES:
            return frame if type(frame) is bytes else bytes(frame)
        if code == _BYTEARRAY:
            return frame if type(frame) is bytearray else bytearray(frame)
        if code == _MEMORYVIEW:
            return memoryview(frame)
        raise DeserializationError(f"unknown extension type {code} in header")

    @staticmethod
    def list_hook(items: list[Any]) -> Any:
        if items:
            head = items[0]
            if head is _TUPLE_MARK:
                return tuple(items[1:])
            if head is _RECORD_MARK:
                return messages.load(items[1:])
            if head is _BATCH_MARK:
                del items[0]
                return Batch(items)
        return items


def loads(frames: Sequence[Frame]) -> Any:
    """Inverse of ``dumps``. Raises ``DeserializationError`` on frames that do not decode."""
    if not frames:
        raise DeserializationError("a message needs at least its header frame")
    if len(frames) == 2 and frames[0] == _ONE_FRAME_BATCH:  # most batches: no msgpack call
        try:
            obj = pickle.loads(frames[1])
        except Exception as e:
            raise DeserializationError(f"cannot decode message: {type(e).__name__}: {e}") from e
        if type(obj) is not list:
            raise DeserializationError(f"a pickled batch holds a {type(obj).__name__}")
        return Batch(obj)
    dec = _Decoder(frames)
    try:
        return msgpack.unpackb(
            frames[0],
            ext_hook=dec.ext_hook,
            list_hook=dec.list_hook,
            strict_map_key=False,
            raw=False,
            use_list=True,
        )
    except DeserializationError:
        raise
    except Exception as e:  # anything a corrupt header or a failing unpickle raises
        raise DeserializationError(f"cannot decode message: {type(e).__name__}: {e}") from e
