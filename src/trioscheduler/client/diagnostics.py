"""Looking into the cluster from a client: what runs where (``processing``, ``nbytes``,
``call_stack``, ``story``), a statistical ``profile`` of the workers' task threads, the
``get_task_stream`` of finished tasks, recent log lines, metadata, package versions,
``dump_cluster_state`` and ``benchmark_hardware``.

Each method is one request to the scheduler (``server/diagnostics.py`` answers it,
reaching the workers where needed); the formats are dask's.
"""

from __future__ import annotations

import gzip
import time
from collections import defaultdict
from typing import Any

import msgpack
import trio

from trioscheduler.client.base import ClientBase
from trioscheduler.client.futures import futures_of
from trioscheduler.core.scheduler_records import key_prefix
from trioscheduler.server.diagnostics import REQUIRED_PACKAGES, versions

__all__ = ["DiagnosticsMethods", "get_task_stream"]

_NO_DEFAULT: Any = object()


def _keys_of(futures_or_keys: Any) -> list[Any] | None:
    if futures_or_keys is None:
        return None
    if not isinstance(futures_or_keys, (list, tuple, set, frozenset, dict)):
        futures_or_keys = [futures_or_keys]
    found = futures_of(futures_or_keys)
    if found:
        return list(dict.fromkeys(f.key for f in found))
    return list(futures_or_keys)


def _when(x: Any) -> float | None:
    """A time for ``start``/``stop``: epoch seconds, or dask's ``"10s"`` (that long ago)."""
    if x is None or isinstance(x, (int, float)):
        return x
    if isinstance(x, str):
        from dask.utils import parse_timedelta

        return time.time() - float(parse_timedelta(x))
    raise TypeError(f"a time must be epoch seconds or a duration like '10s', got {x!r}")


def _needs_dashboard(what: str) -> ValueError:
    return ValueError(
        f"{what} draws a bokeh figure, which comes with trioscheduler's dashboard; "
        "call it without plot=/filename= for the data"
    )


class DiagnosticsMethods(ClientBase):
    """``Client`` methods that look into the cluster (mixed into ``Client``)."""

    def processing(self, workers: Any = None) -> Any:
        """``{worker: [keys of the tasks processing there]}``."""
        return self.sync(self.rpc, {"op": "processing", "workers": _worker_list(workers)})

    def nbytes(self, keys: Any = None, summary: bool = True, **kwargs: Any) -> Any:
        """Bytes of the keys in memory: ``{key: nbytes}``, or summed per key prefix
        (``{"inc": 8000, ...}``) with ``summary=True``."""
        if kwargs:
            raise TypeError(f"nbytes() got unexpected keyword arguments {sorted(kwargs)}")
        return self.sync(self._nbytes, _keys_of(keys), summary)

    async def _nbytes(self, keys: list[Any] | None, summary: bool) -> dict[Any, int]:
        pairs = await self.rpc({"op": "nbytes", "keys": keys})
        if not summary:
            return {k: n for k, n in pairs}
        out: defaultdict[str, int] = defaultdict(int)
        for k, n in pairs:
            out[key_prefix(k)] += n
        return dict(out)

    def call_stack(self, futures: Any = None, keys: Any = None) -> Any:
        """``{worker: {key: [stack lines]}}`` of the tasks running now (``futures`` or
        ``keys`` only, if given)."""
        wanted = _keys_of(futures) if futures is not None else _keys_of(keys)
        return self.sync(self.rpc, {"op": "call_stack", "keys": wanted})

    def profile(
        self,
        key: Any = None,
        start: Any = None,
        stop: Any = None,
        workers: Any = None,
        merge_workers: bool = True,
        plot: bool = False,
        filename: str | None = None,
        server: bool = False,
        scheduler: bool = False,
    ) -> Any:
        """A statistical profile of the workers' task threads (dask's tree format),
        between ``start`` and ``stop``, of tasks with ``key``'s prefix; per worker with
        ``merge_workers=False``."""
        if plot or filename:
            raise _needs_dashboard("profile(plot=True)")
        if server or scheduler:
            raise ValueError(
                "profile(server=True/scheduler=True): trioscheduler samples only the task "
                "threads; the servers' own loops run under trio and are not sampled"
            )
        request = {
            "op": "profile",
            "key": key,
            "start": _when(start),
            "stop": _when(stop),
            "workers": _worker_list(workers),
            "merge_workers": merge_workers,
        }
        return self.sync(self.rpc, request)

    def story(self, *keys_or_stimuli: Any, on_error: str = "raise") -> Any:
        """The scheduler's transitions of these keys (or stimulus ids), oldest first:
        ``(key, start, finish, stimulus_id, time)`` tuples."""
        if on_error not in ("raise", "ignore"):
            raise ValueError(f"on_error= takes 'raise' or 'ignore', got {on_error!r}")
        wanted = _keys_of(list(keys_or_stimuli)) or []
        return self.sync(self._story, wanted)

    async def _story(self, wanted: list[Any]) -> list[tuple[Any, ...]]:
        return [tuple(e) for e in await self.rpc({"op": "story", "keys": wanted})]

    # -- logs ---------------------------------------------------------------------------

    def get_scheduler_logs(self, n: int | None = None) -> Any:
        """The scheduler's recent log lines, newest first: ``[(level, line), ...]``."""
        return self.sync(self._logs, {"op": "scheduler_logs", "n": _count(n)}, None)

    def get_worker_logs(
        self, n: int | None = None, workers: Any = None, nanny: bool = False
    ) -> Any:
        """``{worker: [(level, line), ...]}``, newest first."""
        request = {
            "op": "worker_logs",
            "n": _count(n),
            "workers": _worker_list(workers),
            "nanny": nanny,
        }
        return self.sync(self._logs, request, True)

    async def _logs(self, request: dict[str, Any], per_worker: Any) -> Any:
        got = await self.rpc(request)
        if per_worker:
            return {w: [tuple(r) for r in lines] for w, lines in got.items()}
        return [tuple(r) for r in got]

    # -- metadata -----------------------------------------------------------------------

    def set_metadata(self, key: Any, value: Any) -> Any:
        """Store ``value`` on the scheduler under ``key`` (a list is a path into nested dicts)."""
        return self.sync(self.rpc, {"op": "set_metadata", "keys": _path(key), "value": value})

    def get_metadata(self, keys: Any, default: Any = _NO_DEFAULT) -> Any:
        """The value stored under ``keys``; ``KeyError`` if the path does not exist (or
        ``default``)."""
        return self.sync(self._get_metadata, _path(keys), default)

    async def _get_metadata(self, keys: Any, default: Any) -> Any:
        got = await self.rpc({"op": "get_metadata", "keys": keys})
        if "value" in got:
            return got["value"]
        if default is not _NO_DEFAULT:
            return default
        raise KeyError(f"no metadata under {got['missing']!r} (asked for {keys!r})")

    # -- versions -----------------------------------------------------------------------

    def get_versions(self, check: bool = False, packages: list[str] | None = None) -> Any:
        """``{"scheduler", "workers": {address: ...}, "client"}``, each ``{"host",
        "packages"}``. ``check=True`` raises ``ValueError`` if the required packages
        differ anywhere."""
        if packages is not None and (
            isinstance(packages, str) or not all(isinstance(p, str) for p in packages)
        ):
            raise TypeError(f"packages= takes a list of package names, got {packages!r}")
        return self.sync(self._get_versions, check, list(packages or []))

    async def _get_versions(self, check: bool, packages: list[str]) -> dict[str, Any]:
        got: dict[str, Any] = await self.rpc({"op": "versions", "packages": packages})
        got["client"] = versions(packages)
        if check:
            _check_versions(got, [*REQUIRED_PACKAGES, *packages])
        return got

    # -- task stream, dumps, benchmarks -------------------------------------------------

    def get_task_stream(
        self,
        start: Any = None,
        stop: Any = None,
        count: int | None = None,
        plot: bool = False,
        filename: str = "task-stream.html",
        bokeh_resources: Any = None,
    ) -> Any:
        """Records of finished tasks: ``{"key", "worker", "status", "startstops":
        [{"action": "compute", "start", "stop"}], "nbytes", "type"}``, oldest first."""
        if plot or bokeh_resources is not None:
            raise _needs_dashboard("get_task_stream(plot=True)")
        request = {"op": "task_stream", "start": _when(start), "stop": _when(stop), "count": count}
        return self.sync(self.rpc, request)

    def dump_cluster_state(
        self,
        filename: str = "dask-cluster-dump",
        write_from_scheduler: bool | None = None,
        exclude: Any = (),
        format: str = "msgpack",
        **storage_options: Any,
    ) -> Any:
        """Write the scheduler's and workers' state (tasks, workers, events, logs) to
        ``filename.msgpack.gz`` or ``filename.yaml``, for debugging."""
        if format not in ("msgpack", "yaml"):
            raise ValueError(f"format= takes 'msgpack' or 'yaml', got {format!r}")
        if write_from_scheduler:
            raise ValueError(
                "dump_cluster_state(write_from_scheduler=True): the dump is written by the "
                "client only; leave it unset"
            )
        if storage_options:
            raise TypeError(
                f"dump_cluster_state: storage options {sorted(storage_options)} need fsspec "
                "paths, which trioscheduler does not write to; give a local filename"
            )
        return self.sync(self._dump, filename, list(exclude), format)

    async def _dump(self, filename: str, exclude: list[str], format: str) -> str:
        state = await self.rpc({"op": "dump_state", "exclude": exclude})
        state["versions"]["client"] = versions()
        return await trio.to_thread.run_sync(_write_dump, filename, _plain(state), format)

    def benchmark_hardware(self) -> Any:
        """Bandwidths (bytes per second, per payload size) of the workers' ``memory``
        and ``disk`` (averaged over workers) and of the ``network`` to them."""
        return self.sync(self.rpc, {"op": "benchmark_hardware"})


def _worker_list(workers: Any) -> list[str] | None:
    if workers is None:
        return None
    if isinstance(workers, str):
        return [workers]
    if not isinstance(workers, (list, tuple, set, frozenset)):
        raise TypeError(f"workers= takes an address or a list of them, got {workers!r}")
    return list(workers)


def _count(n: Any) -> int | None:
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise ValueError(f"n must be a non-negative integer or None, got {n!r}")
    return n


def _path(key: Any) -> list[Any]:
    path = list(key) if isinstance(key, (list, tuple)) else [key]
    if not path:
        raise ValueError("metadata keys must not be an empty list")
    return path


def _check_versions(got: dict[str, Any], names: list[str]) -> None:
    where = {"client": got["client"], "scheduler": got["scheduler"]}
    where.update({f"worker {a}": v for a, v in got["workers"].items()})
    lines = []
    for name in dict.fromkeys(names):
        seen = {place: v["packages"].get(name) for place, v in where.items()}
        if len(set(seen.values())) > 1:
            detail = ", ".join(f"{place}: {ver}" for place, ver in seen.items())
            lines.append(f"  {name}: {detail}")
    if lines:
        raise ValueError("Mismatched versions found\n" + "\n".join(lines))


def _write_dump(filename: str, state: dict[str, Any], format: str) -> str:
    if format == "yaml":
        import yaml

        path = f"{filename}.yaml"
        with open(path, "w") as f:
            yaml.safe_dump(state, f)
    else:
        path = f"{filename}.msgpack.gz"
        with gzip.open(path, "wb") as f:
            f.write(msgpack.packb(state, use_bin_type=True))
    return path


def _plain(obj: Any) -> Any:
    """Only what msgpack and safe YAML write: dicts with string keys, lists, scalars."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return repr(obj)


class get_task_stream:  # noqa: N801 - dask's name
    """``with get_task_stream() as ts: ...`` then ``ts.data``: the task stream records of
    what ran inside the block (dask's context manager)."""

    def __init__(
        self, client: Any = None, plot: bool = False, filename: str = "task-stream.html"
    ) -> None:
        if plot:
            raise _needs_dashboard("get_task_stream(plot=True)")
        from trioscheduler.client.base import default_client

        self.client = client if client is not None else default_client()
        self.data: list[dict[str, Any]] = []
        self._start = 0.0

    def __enter__(self) -> get_task_stream:
        self._start = time.time()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.data.extend(self.client.get_task_stream(start=self._start))
