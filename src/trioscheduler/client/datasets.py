"""Published datasets, the client's side (the scheduler's is ``server/datasets.py``).

``pack``/``unpack`` pickle a value with every ``Future`` inside it (also inside a
persisted collection's graph) written as a reference to its key; ``get_dataset``
unpickles the bytes in the asking client, each reference becoming a new ``Future`` of
that client. ``Datasets`` is ``client.datasets``, a ``MutableMapping`` over the client's
methods.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, cast

import cloudpickle
from dask.base import is_dask_collection

from trioscheduler.client.base import ClientBase
from trioscheduler.client.futures import Future
from trioscheduler.server.datasets import DatasetExistsError

if TYPE_CHECKING:
    from trioscheduler.client.client import Client

__all__ = [
    "DatasetMethods",
    "NO_DEFAULT",
    "DatasetExistsError",
    "Datasets",
    "dataset_names",
    "get_dataset",
    "pack",
    "publish",
    "unpack",
]

NO_DEFAULT: Any = object()  # get_dataset(name) without default= raises KeyError


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, with each ``Future`` written as a reference to its key."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=5)
        self.keys: dict[Any, None] = {}

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is Future:
            self.keys[obj.key] = None
            return ("future", obj.key)
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, make_future: Callable[[Any], Any]) -> None:
        super().__init__(file)
        self._make_future = make_future

    def persistent_load(self, pid: Any) -> Any:
        kind, key = pid
        if kind != "future":
            raise pickle.UnpicklingError(f"unknown reference {pid!r} in a dataset")
        return self._make_future(key)


def pack(value: Any) -> tuple[bytes, list[Any]]:
    """``(bytes, keys)``: ``value`` pickled with its futures as references to their keys."""
    buf = io.BytesIO()
    p = _Pickler(buf)
    try:
        p.dump(value)
    except Exception as exc:
        raise TypeError(
            f"cannot publish {value!r:.100}: it cannot be pickled ({type(exc).__name__}: {exc})"
        ) from exc
    return buf.getvalue(), list(p.keys)


def unpack(blob: bytes, client: Client) -> Any:
    """The published value, every future in it a new ``Future`` of ``client``."""
    return _Unpickler(io.BytesIO(blob), lambda key: Future(key, client)).load()


def dataset_names(args: tuple[Any, ...], name: Any, kwargs: dict[str, Any]) -> dict[Any, Any]:
    """``{name: value}`` from ``publish_dataset``'s three call forms.

    ``publish_dataset(x=value)``; ``publish_dataset(value, name="x")``; and positional
    values alone: a dict of ``{name: value}``, or collections (and futures) named by
    their dask name (``df._name``, ``array.name``, ``delayed.key``, ``future.key``).
    """
    out: dict[Any, Any] = dict(kwargs)
    if name is not None:
        if not args:
            raise ValueError("publish_dataset(value, name='x') needs the value to publish")
        out[name] = args[0] if len(args) == 1 else args
        return out
    for arg in args:
        if isinstance(arg, Mapping):
            out.update(arg)
        elif type(arg) is Future:
            out[arg.key] = arg
        elif is_dask_collection(arg):
            out[_collection_name(arg)] = arg
        else:
            raise TypeError(
                f"publish_dataset: a positional argument must be a dask collection, a Future "
                f"or a dict of {{name: value}}, got {type(arg).__name__}; name it instead: "
                "publish_dataset(my_name=value)"
            )
    if not out:
        raise ValueError("publish_dataset() needs something to publish, e.g. name=value")
    return out


def _collection_name(coll: Any) -> Any:
    for attr in ("_name", "name", "key"):
        try:  # a Delayed answers any attribute with another Delayed: check the type
            value = getattr(coll, attr, None)
        except Exception:
            value = None
        if isinstance(value, str | tuple) and value:
            return value
    keys = coll.__dask_keys__()
    while isinstance(keys, list) and keys:
        keys = keys[0]
    return keys


async def publish(client: ClientBase, items: list[list[Any]], override: bool) -> None:
    error = await client.rpc({"op": "publish_put", "items": items, "override": override})
    if error is not None:
        raise DatasetExistsError(error)


async def get_dataset(client: ClientBase, name: Any, default: Any) -> Any:
    [blob] = await client.rpc({"op": "publish_get", "names": [name]})
    if blob is None:
        if default is NO_DEFAULT:
            raise KeyError(f"dataset {name!r} is not published")
        return default
    return unpack(blob, cast("Client", client))  # every ClientBase made is a Client


class DatasetMethods(ClientBase):
    """``Client`` methods for published datasets (mixed into ``Client``)."""

    @property
    def datasets(self) -> Datasets:
        """dask's ``client.datasets``: the published datasets as a mapping."""
        return Datasets(self)

    # -- published datasets ---------------------------------------------------------------

    def publish_dataset(
        self, *args: Any, name: Any = None, override: bool = False, **kwargs: Any
    ) -> Any:
        """Publish futures or (persisted) collections under names, for any client.

        ``publish_dataset(x=df)``, ``publish_dataset(df, name="x")``, or collections
        alone (named by their dask name). The scheduler keeps their data in cluster
        memory until ``unpublish_dataset``, also after this client disconnects. An
        existing name raises ``DatasetExistsError`` (a ``KeyError``) unless ``override``.
        """
        items = [
            [n, *pack(value)]
            for n, value in dataset_names(args, name, kwargs).items()
        ]
        return self.sync(publish, self, items, override)

    def list_datasets(self) -> Any:
        """The names of the published datasets."""
        return self.sync(self.rpc, {"op": "publish_list"})

    def get_dataset(self, name: Any, default: Any = NO_DEFAULT) -> Any:
        """The dataset published as ``name``, its futures now held by this client.

        An unknown name raises ``KeyError`` naming it, or returns ``default`` if given.
        """
        return self.sync(get_dataset, self, name, default)

    def unpublish_dataset(self, name: Any) -> Any:
        """Forget dataset ``name`` (its data is released unless a client holds it);
        returns the names that were published (unknown names are ignored)."""
        names = name if isinstance(name, list) else [name]
        return self.sync(self.rpc, {"op": "publish_delete", "names": names})


class Datasets(MutableMapping[Any, Any]):
    """``client.datasets``: the published datasets as a mapping (sync clients).

    With an asynchronous client only ``await client.datasets[name]`` works; use the
    client's ``*_dataset`` methods for the rest.
    """

    __slots__ = ("_client",)

    def __init__(self, client: DatasetMethods) -> None:
        self._client = client

    def _sync_only(self, what: str, instead: str) -> None:
        if self._client.asynchronous:
            raise TypeError(f"{what} needs a sync client; with an asynchronous one use {instead}")

    def __getitem__(self, name: Any) -> Any:
        return self._client.get_dataset(name)

    def __setitem__(self, name: Any, value: Any) -> None:
        self._sync_only("client.datasets[name] = value", "await client.publish_dataset(name=value)")
        self._client.publish_dataset(value, name=name)

    def __delitem__(self, name: Any) -> None:
        self._sync_only("del client.datasets[name]", "await client.unpublish_dataset(name)")
        if name not in self._client.unpublish_dataset(name):
            raise KeyError(f"dataset {name!r} is not published")

    def __iter__(self) -> Iterator[Any]:
        self._sync_only("iterating client.datasets", "await client.list_datasets()")
        return iter(self._client.list_datasets())

    def __len__(self) -> int:
        self._sync_only("len(client.datasets)", "len(await client.list_datasets())")
        return len(self._client.list_datasets())

    def __contains__(self, name: object) -> bool:
        self._sync_only("'name in client.datasets'", "await client.list_datasets()")
        return name in self._client.list_datasets()
