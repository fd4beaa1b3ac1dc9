"""What the scheduler keeps and answers beyond task state: events and topics, metadata,
the task stream, workers' latest heartbeat metrics, recent log lines, and requests that
look at (``processing``, ``nbytes``, ``story``, ``call_stack``, ``profile``, versions) or
manage (``retire_workers``, ``restart_workers``, ``replicate``) the cluster.

``Diagnostics`` is the scheduler's store of these; ``HANDLERS`` are its RPC operations,
each ``handler(scheduler, request)``, merged into the scheduler's table. Decisions about
task state stay in the core: retirement is the core's ``RetireWorker`` event, replica
placement ``core.replication.plan_replicas``; the new copies reach the core as ordinary
``AddKeys``. Functions run on workers (logs, stacks, profile, versions, benchmarks) are
module-level functions here, shipped by reference in a ``run`` request.
"""

from __future__ import annotations

import gc
import importlib.metadata
import locale
import logging
import os
import platform
import struct
import sys
import tempfile
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import cloudpickle
import trio

from trioscheduler.core import messages as m
from trioscheduler.core.replication import plan_rebalance, plan_replicas
from trioscheduler.errors import TrioSchedulerError
from trioscheduler.http import logs
from trioscheduler.server import profiling
from trioscheduler.server.scheduler_config import amm_config

if TYPE_CHECKING:
    from trioscheduler.server.scheduler import Scheduler

__all__ = ["HANDLERS", "Diagnostics", "install_log_buffer", "versions"]

logger = logging.getLogger("trioscheduler.scheduler")

EVENTS_PER_TOPIC = 100_000  # dask's distributed.scheduler.events-log-length
TASK_STREAM_LENGTH = 100_000
BROADCAST_TOPICS = frozenset({"print", "warn"})  # trioscheduler.print/warn inside tasks
REQUIRED_PACKAGES = ("python", "trioscheduler", "dask", "cloudpickle", "msgpack", "trio")
OPTIONAL_PACKAGES = ("numpy", "pandas", "lz4", "toolz")


# -- log lines ---------------------------------------------------------------------------


def install_log_buffer() -> logs.LogBuffer:
    """This process's buffer of recent log lines (``get_scheduler_logs``/``get_worker_logs``)."""
    return logs.install()


def recent_logs(n: int | None = None) -> list[tuple[str, str]]:
    """``[(level, line), ...]``, newest first (dask's order)."""
    return logs.install().recent(n)


# -- versions ----------------------------------------------------------------------------


def versions(packages: list[str] | None = None) -> dict[str, Any]:
    """``{"host": {...}, "packages": {name: version or None}}`` of this process."""
    host = {
        "python": ".".join(str(x) for x in sys.version_info),
        "python-bits": struct.calcsize("P") * 8,
        "OS": platform.system(),
        "OS-release": platform.release(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "byteorder": sys.byteorder,
        "LC_ALL": os.environ.get("LC_ALL", "None"),
        "LANG": os.environ.get("LANG", "None"),
        "locale": ".".join(str(x) for x in locale.getlocale()),
    }
    names = [*REQUIRED_PACKAGES, *OPTIONAL_PACKAGES, *(packages or [])]
    pkgs: dict[str, str | None] = {}
    for name in dict.fromkeys(names):
        if name == "python":
            pkgs[name] = ".".join(map(str, sys.version_info[:3]))
            continue
        try:
            pkgs[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pkgs[name] = None
    return {"host": host, "packages": pkgs}


# -- functions run on workers ------------------------------------------------------------


def worker_logs(n: int | None) -> list[tuple[str, str]]:
    return recent_logs(n)


def worker_call_stacks(keys: list[Any]) -> dict[Any, list[str]]:
    return profiling.call_stacks(keys)


def worker_profile(start: float | None, stop: float | None, key: Any) -> dict[str, Any]:
    return profiling.sampler().profile(start, stop, key)


def worker_benchmark(sizes: list[int], duration: float) -> dict[str, dict[int, float]]:
    """Bytes per second copying memory and writing+reading a file, per size."""
    out: dict[str, dict[int, float]] = {"memory": {}, "disk": {}}
    for size in sizes:
        data = os.urandom(size)
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < duration:
            bytearray(data)
            count += 1
        out["memory"][size] = size * count / (time.perf_counter() - t0)
    with tempfile.TemporaryDirectory(prefix="trioscheduler-benchmark-") as tmp:
        path = os.path.join(tmp, "data")
        for size in sizes:
            data = os.urandom(size)
            count, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < duration:
                with open(path, "wb") as f:
                    f.write(data)
                    f.flush()
                with open(path, "rb") as f:
                    f.read()
                count += 1
            out["disk"][size] = size * count / (time.perf_counter() - t0)
    return out


def _echo(data: bytes) -> int:
    return len(data)


# -- the scheduler's store ---------------------------------------------------------------


class Diagnostics:
    """Events, subscriptions, metadata, the task stream and worker metrics of one scheduler."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.events: defaultdict[str, deque[tuple[float, Any]]] = defaultdict(
            lambda: deque(maxlen=EVENTS_PER_TOPIC)
        )
        self.subscribers: defaultdict[str, set[str]] = defaultdict(set)
        self.metadata: dict[Any, Any] = {}
        # (key, worker, erred, start, stop, nbytes, type_name) of each finished task, made
        # into dask's dicts only when asked: a dict with its startstops list costs ~500
        # bytes more, times the 100,000 kept
        self.task_stream: deque[tuple[Any, ...]] = deque(maxlen=TASK_STREAM_LENGTH)
        self.metrics: dict[str, dict[str, Any]] = {}
        self._changed = trio.Event()  # set when a worker reports replicas or leaves
        install_log_buffer()

    async def until(self, done: Callable[[], bool]) -> None:
        """Until ``done()``, checked after each worker message about replicas or removal
        has been handled (``observe`` runs first; the core handles it before any wait
        wakes: the feed is synchronous)."""
        while not done():
            await self._changed.wait()

    # -- the Active Memory Manager ---------------------------------------------------
    # The core decides (ReduceReplicas on its ticks: ``core/scheduler_retirement.py``);
    # these only switch it, as ``client.amm`` asks.

    def amm_run_once(self) -> int:
        """Run ReduceReplicas now; how many copies it dropped."""
        s = self.scheduler
        before = s.state.amm_dropped
        s._feed(m.ActiveMemoryManager(s._stimulus("amm"), trio.current_time(), "run_once"))
        return s.state.amm_dropped - before

    def amm_start(self) -> None:
        """Run it every ``interval`` seconds of the config (the scheduler starts it
        itself unless the config says ``start: false``, as dask's)."""
        s = self.scheduler
        if s.state.amm_interval is None:
            _, interval = amm_config()
            s._feed(m.ActiveMemoryManager(s._stimulus("amm"), trio.current_time(), "start", interval))

    def amm_stop(self) -> None:
        s = self.scheduler
        if s.state.amm_interval is not None:
            s._feed(m.ActiveMemoryManager(s._stimulus("amm"), trio.current_time(), "stop"))

    def observe(self, msg: Any) -> None:
        """A message from a worker's stream, before the core sees it."""
        t = type(msg)
        if t is m.TaskFinished or t is m.TaskErred:
            # the key and worker strings the scheduler already holds, not the message's
            # fresh copies (~150 bytes a row)
            ts = self.scheduler.state.tasks.get(msg.key)
            key = msg.key if ts is None else ts.key
            ws = self.scheduler.state.workers.get(msg.worker)
            worker = msg.worker if ws is None else ws.address
            if t is m.TaskFinished:
                row = (key, worker, False, msg.start, msg.stop, msg.nbytes, msg.type_name)
            else:
                row = (key, worker, True, msg.start, msg.stop, 0, "")
            self.task_stream.append(row)
        elif t is m.WorkerHeartbeat:
            self.metrics[msg.worker] = dict(msg.metrics)
        elif t is m.RemoveWorker:
            self.metrics.pop(msg.worker, None)
        if t is m.AddKeys or t is m.ReleaseWorkerData or t is m.RemoveWorker:
            self._changed.set()
            self._changed = trio.Event()

    def worker_left(self) -> None:
        """The scheduler shell saw a worker's stream end."""
        self._changed.set()
        self._changed = trio.Event()

    def log_event(self, topics: Any, msg: Any) -> None:
        """Record ``msg`` under each topic; subscribed clients get it pushed."""
        ts = time.time()
        for topic in [topics] if isinstance(topics, str) else list(topics):
            self.events[topic].append((ts, msg))
            # what tasks print or warn goes to every client, as dask's clients subscribe
            # to these topics when they start
            to = self.scheduler._clients if topic in BROADCAST_TOPICS else ()
            for cid in list(to):
                self.scheduler._send(
                    self.scheduler._clients,
                    cid,
                    {"op": "event", "topic": topic, "event": [ts, msg]},
                )
            for cid in list(self.subscribers.get(topic, ()) if not to else ()):
                if cid in self.scheduler._clients:
                    self.scheduler._send(
                        self.scheduler._clients,
                        cid,
                        {"op": "event", "topic": topic, "event": [ts, msg]},
                    )
                else:
                    self.subscribers[topic].discard(cid)

    def worker_message(self, addr: str, msg: dict[str, Any]) -> bool:
        """A dict on a worker's stream that is ours (``log-event``); True if handled."""
        if msg.get("op") != "log-event":
            return False
        topic = msg.get("topic")
        if not (isinstance(topic, str) or isinstance(topic, list)):
            raise ValueError(f"worker {addr} sent a log-event without a topic: {msg!r:.200}")
        self.log_event(topic, msg.get("msg"))
        return True


# -- helpers ---------------------------------------------------------------------------


def _resolve_workers(s: Scheduler, names: Any) -> list[str]:
    """Worker addresses for addresses or names; ``ValueError`` naming the unknown ones."""
    if names is None:
        return sorted(s.state.workers)
    if isinstance(names, str):
        names = [names]
    by_name = {str(ws.name): a for a, ws in s.state.workers.items() if ws.name is not None}
    out: list[str] = []
    unknown: list[Any] = []
    for n in names:
        if n in s.state.workers:
            out.append(n)
        elif str(n) in by_name:
            out.append(by_name[str(n)])
        else:
            unknown.append(n)
    if unknown:
        raise ValueError(
            f"unknown workers {unknown!r}; the scheduler has {sorted(s.state.workers)}"
        )
    return list(dict.fromkeys(out))


async def on_workers(
    s: Scheduler,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    workers: list[str],
    timeout: float = 60.0,  # noqa: ASYNC109
    per_worker: Callable[[str], tuple[Any, ...]] | None = None,
) -> dict[str, Any]:
    """``fn(*args)`` on each worker (``per_worker(addr)`` gives the args per worker);
    ``{address: result}``; a worker that fails raises, naming it."""
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}

    async def one(addr: str) -> None:
        a = per_worker(addr) if per_worker is not None else args
        payload = cloudpickle.dumps((fn, a, {}), protocol=5)
        reply = await s._run_on_worker(addr, payload, timeout)
        if reply.get("status") == "OK":
            results[addr] = reply["result"]
        else:
            errors[addr] = str(reply.get("text"))

    async with trio.open_nursery() as nursery:
        for addr in workers:
            nursery.start_soon(one, addr)
    if errors:
        raise TrioSchedulerError(
            "; ".join(f"worker {a}: {text}" for a, text in sorted(errors.items()))
        )
    return results


def _diag(s: Scheduler) -> Diagnostics:
    return s.diagnostics


# -- RPC operations ----------------------------------------------------------------------


async def op_processing(s: Scheduler, request: dict[str, Any]) -> dict[str, list[Any]]:
    workers = _resolve_workers(s, request.get("workers"))
    return {a: list(s.state.workers[a].processing) for a in workers}


async def op_nbytes(s: Scheduler, request: dict[str, Any]) -> list[list[Any]]:
    keys = request.get("keys")
    tasks = s.state.tasks
    if keys is None:
        keys = [k for k, ts in tasks.items() if ts.state == "memory"]
    return [[k, tasks[k].nbytes] for k in keys if k in tasks and tasks[k].state == "memory"]


async def op_story(s: Scheduler, request: dict[str, Any]) -> list[list[Any]]:
    wanted = list(request.get("keys") or [])
    log = s.state.log
    hits = set()
    for k in wanted:
        try:
            hits.add(k)
        except TypeError:
            continue
    # the core's times are the scheduler loop's clock; users compare them with epoch times
    offset = time.time() - trio.current_time()
    return [
        [key, start, finish, stimulus, now + offset]
        for key, start, finish, stimulus, now in zip(
            log.keys, log.starts, log.finishes, log.stimuli, log.nows, strict=True
        )
        if key in hits or stimulus in hits
    ]


async def op_events(s: Scheduler, request: dict[str, Any]) -> Any:
    events = _diag(s).events
    topic = request.get("topic")
    if topic is not None:
        return [list(e) for e in events.get(topic, ())]
    return {t: [list(e) for e in q] for t, q in events.items()}


async def op_log_event(s: Scheduler, request: dict[str, Any]) -> None:
    topic = request.get("topic")
    if not isinstance(topic, (str, list)) or not topic:
        raise ValueError(f"log_event needs a topic (a string or a list of them), got {topic!r}")
    _diag(s).log_event(topic, request.get("msg"))


async def op_subscribe_topic(s: Scheduler, request: dict[str, Any]) -> None:
    client = request.get("client")
    if not isinstance(client, str) or client not in s._clients:
        raise ValueError(f"subscribe_topic from unknown client {client!r}")
    _diag(s).subscribers[str(request["topic"])].add(client)


async def op_unsubscribe_topic(s: Scheduler, request: dict[str, Any]) -> None:
    client = request.get("client")
    _diag(s).subscribers[str(request["topic"])].discard(str(client))


async def op_scheduler_logs(s: Scheduler, request: dict[str, Any]) -> list[list[str]]:
    return [list(r) for r in recent_logs(request.get("n"))]


async def op_worker_logs(s: Scheduler, request: dict[str, Any]) -> dict[str, list[list[str]]]:
    workers = _resolve_workers(s, request.get("workers"))
    if request.get("nanny"):
        raise ValueError(
            "get_worker_logs(nanny=True): a nanny keeps no log of its own in trioscheduler; "
            "its messages go to its worker's process log"
        )
    got = await on_workers(s, worker_logs, (request.get("n"),), workers)
    return {a: [list(r) for r in lines] for a, lines in got.items()}


def _check_path(keys: Any) -> list[Any]:
    path = list(keys) if isinstance(keys, (list, tuple)) else [keys]
    if not path:
        raise ValueError("metadata keys must not be empty")
    return path


async def op_set_metadata(s: Scheduler, request: dict[str, Any]) -> None:
    path = _check_path(request["keys"])
    d = _diag(s).metadata
    for k in path[:-1]:
        nxt = d.get(k)
        if not isinstance(nxt, dict):
            nxt = d[k] = {}
        d = nxt
    d[path[-1]] = request["value"]


async def op_get_metadata(s: Scheduler, request: dict[str, Any]) -> dict[str, Any]:
    path = _check_path(request["keys"])
    d: Any = _diag(s).metadata
    for i, k in enumerate(path):
        if not isinstance(d, dict) or k not in d:
            return {"missing": path[: i + 1]}
        d = d[k]
    return {"value": d}


def _stream_record(row: tuple[Any, ...]) -> dict[str, Any]:
    """dask's task-stream dict of one ``Diagnostics.task_stream`` row."""
    key, worker, erred, start, stop, nbytes, type_name = row
    record: dict[str, Any] = {
        "key": key,
        "worker": worker,
        "status": "error" if erred else "OK",
        "startstops": [{"action": "compute", "start": start, "stop": stop}],
    }
    if not erred:
        record["nbytes"] = nbytes
        record["type"] = type_name
    return record


async def op_task_stream(s: Scheduler, request: dict[str, Any]) -> list[dict[str, Any]]:
    start, stop, count = request.get("start"), request.get("stop"), request.get("count")
    rows = [
        r
        for r in _diag(s).task_stream
        if (start is None or r[4] >= start) and (stop is None or r[3] <= stop)
    ]
    return [_stream_record(r) for r in (rows[-count:] if count else rows)]


async def op_call_stack(s: Scheduler, request: dict[str, Any]) -> dict[str, Any]:
    keys = request.get("keys")
    wanted = None if keys is None else set(keys)
    per: dict[str, list[Any]] = {}
    for addr, ws in s.state.workers.items():
        ks = [k for k in ws.processing if wanted is None or k in wanted]
        if ks:
            per[addr] = ks
    if not per:
        return {}
    got = await on_workers(s, worker_call_stacks, (), sorted(per), per_worker=lambda a: (per[a],))
    return {a: stacks for a, stacks in got.items() if stacks}


async def op_profile(s: Scheduler, request: dict[str, Any]) -> Any:
    workers = _resolve_workers(s, request.get("workers"))
    start, stop, key = request.get("start"), request.get("stop"), request.get("key")
    got = await on_workers(s, worker_profile, (start, stop, key), workers)
    if request.get("merge_workers", True):
        return profiling.merge(*got.values())
    return got


async def op_versions(s: Scheduler, request: dict[str, Any]) -> dict[str, Any]:
    packages = request.get("packages") or []
    workers = await on_workers(s, versions, (packages,), sorted(s.state.workers))
    return {"scheduler": versions(packages), "workers": workers}


async def op_benchmark_hardware(s: Scheduler, request: dict[str, Any]) -> dict[str, Any]:
    sizes = [int(x) for x in request.get("sizes") or [1 << 10, 1 << 16, 1 << 20, 1 << 23]]
    duration = float(request.get("duration", 0.1))
    workers = sorted(s.state.workers)
    if not workers:
        raise ValueError("benchmark_hardware needs at least one worker")
    local = await on_workers(s, worker_benchmark, (sizes, duration), workers)
    network: dict[int, float] = {}
    for size in sizes:
        payload = cloudpickle.dumps((_echo, (os.urandom(size),), {}), protocol=5)
        rates = []
        for addr in workers:
            count, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < duration:
                reply = await s._run_on_worker(addr, payload, 60.0)
                if reply.get("status") != "OK":
                    raise TrioSchedulerError(f"worker {addr}: {reply.get('text')}")
                count += 1
            rates.append(size * count / (time.perf_counter() - t0))
        network[size] = sum(rates) / len(rates)
    out: dict[str, dict[int, float]] = {"network": network}
    for kind in ("memory", "disk"):
        out[kind] = {
            size: sum(r[kind][size] for r in local.values()) / len(local) for size in sizes
        }
    return out


async def op_retire_workers(s: Scheduler, request: dict[str, Any]) -> dict[str, Any]:
    names = request.get("workers")
    timeout = float(request.get("timeout", 60))
    if names is None:  # dask picks for itself: here, the workers with nothing to do
        idle = [a for a, ws in s.state.workers.items() if not ws.processing and not ws.has_what]
        workers = sorted(idle)[: max(0, len(s.state.workers) - 1)]
    else:
        workers = _resolve_workers(s, names)
    info = {a: s._worker_info(a, s.state.workers[a]) for a in workers}
    for addr in workers:
        s._feed(m.RetireWorker(s._stimulus("retire-workers"), trio.current_time(), addr))

    def settled() -> bool:
        left = [a for a in workers if a in s.state.workers]
        return not left or all(s.state.workers[a].status == "running" for a in left)

    with trio.move_on_after(timeout):
        await _diag(s).until(settled)
    stuck = [a for a in workers if a in s.state.workers]
    if stuck:
        raise TrioSchedulerError(
            f"could not retire {stuck} within {timeout} s: no other running worker "
            "could take their data (they keep running)"
        )
    s._notify_workers_changed()
    return info


async def op_restart_workers(s: Scheduler, request: dict[str, Any]) -> dict[str, str]:
    workers = _resolve_workers(s, request.get("workers") or [])
    timeout = float(request.get("timeout", 60))
    no_nanny = [a for a in workers if not s.state.workers[a].nanny]
    if no_nanny:
        raise ValueError(
            f"restart_workers needs workers run by a nanny; {no_nanny} have none "
            "(LocalCluster(processes=True) or 'trioscheduler worker' start them with one)"
        )
    out: dict[str, str] = {}
    new: dict[str, str] = {}
    assert s._pool is not None
    pool = s._pool

    async def one(addr: str) -> None:
        nanny = s.state.workers[addr].nanny
        assert nanny is not None
        try:
            async with pool.connect(nanny) as stream:
                await stream.send({"op": "restart", "reason": "Client.restart_workers"})
                reply = await stream.receive()
        except (OSError, trio.BrokenResourceError, trio.EndOfChannel) as exc:
            reply = {"status": "error", "text": repr(exc)}
        if reply.get("status") == "OK":
            new[addr] = reply["worker"]
            out[addr] = "OK"
        else:
            out[addr] = f"error: {reply.get('text')}"

    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:
            for addr in workers:
                nursery.start_soon(one, addr)
        while not all(a in s.state.workers for a in new.values()):
            await s._workers_changed.wait()
    for addr in workers:
        if addr not in out:
            out[addr] = f"error: not restarted within {timeout} s"
        elif addr in new and new[addr] not in s.state.workers:
            out[addr] = f"error: the new worker did not join within {timeout} s"
    return out


async def op_replicate(s: Scheduler, request: dict[str, Any]) -> dict[Any, int]:
    keys = list(request["keys"])
    candidates = (
        _resolve_workers(s, request["workers"])
        if request.get("workers") is not None
        else sorted(a for a, ws in s.state.workers.items() if ws.status == "running")
    )
    n = request.get("n")
    n = len(candidates) if n is None else int(n)
    timeout = float(request.get("timeout", 60))
    tasks = s.state.tasks
    holders: dict[Any, list[str]] = {}
    for k in keys:
        ts = tasks.get(k)
        who = (
            [w if isinstance(w, str) else str(w.address) for w in (ts.who_has or ())] if ts else []
        )
        if not who:
            raise ValueError(f"replicate: {k!r} is not in memory on any worker")
        holders[k] = who
    load = {a: len(s.state.workers[a].has_what) for a in candidates}
    plan = plan_replicas(holders, candidates, n, load)
    for target, ks in plan.items():
        s._send(
            s._workers,
            target,
            m.AcquireReplicas(
                s._stimulus("replicate"),
                trio.current_time(),
                {k: holders[k] for k in ks},
                {k: tasks[k].nbytes for k in ks},
            ),
        )
    want = min(n, len(candidates))

    def copies(k: Any) -> int:
        ts = tasks.get(k)
        if ts is None:
            return 0
        return len(
            {w if isinstance(w, str) else w.address for w in ts.who_has or ()} & set(candidates)
        )

    with trio.move_on_after(timeout):
        await _diag(s).until(lambda: all(copies(k) >= want for k in keys))
    return {k: copies(k) for k in keys}


async def op_rebalance(s: Scheduler, request: dict[str, Any]) -> dict[str, int]:
    """Move keys from the fullest workers to the emptiest: copy, then drop the original."""
    names = request.get("workers")
    workers = _resolve_workers(s, names) if names is not None else sorted(s.state.workers)
    workers = [w for w in workers if s.state.workers[w].status == "running"]
    keys = request.get("keys")
    timeout = float(request.get("timeout", 60))
    moves = plan_rebalance(s.state, keys, workers)
    tasks = s.state.tasks
    by_receiver: dict[str, list[tuple[Any, str]]] = {}
    for key, sender, receiver in moves:
        by_receiver.setdefault(receiver, []).append((key, sender))
    for receiver, items in sorted(by_receiver.items()):
        s._send(
            s._workers,
            receiver,
            m.AcquireReplicas(
                s._stimulus("rebalance"),
                trio.current_time(),
                {k: [sender] for k, sender in items},
                {k: tasks[k].nbytes for k, _ in items},
            ),
        )

    def arrived(key: Any, receiver: str) -> bool:
        ts = tasks.get(key)
        return ts is None or receiver in ts.who_has or receiver not in s.state.workers

    with trio.move_on_after(timeout):
        await _diag(s).until(lambda: all(arrived(k, r) for k, _, r in moves))
    by_sender: dict[str, list[Any]] = {}
    moved = 0
    for key, sender, receiver in moves:
        ts = tasks.get(key)
        if ts is not None and receiver in ts.who_has:
            by_sender.setdefault(sender, []).append(key)
            moved += 1
    for sender, ks in sorted(by_sender.items()):
        s._feed(m.DropReplicas(s._stimulus("rebalance"), trio.current_time(), sender, ks))
    return {"moved": moved, "planned": len(moves)}


async def op_amm(s: Scheduler, request: dict[str, Any]) -> Any:
    diag = _diag(s)
    action = request.get("action")
    if action == "start":
        diag.amm_start()
        return None
    if action == "stop":
        diag.amm_stop()
        return None
    if action == "running":
        return s.state.amm_interval is not None
    if action == "run_once":
        return diag.amm_run_once()
    raise ValueError(f"amm: unknown action {action!r} (start, stop, running, run_once)")


async def op_terminate_workers(s: Scheduler, request: dict[str, Any]) -> list[str]:
    """``Client.shutdown`` without a cluster object: close every worker (and its nanny)."""
    workers = sorted(s.state.workers)
    for addr in workers:
        s._send(s._workers, addr, m.CloseWorker(addr, "shutdown"))
    return workers


async def op_dump_state(s: Scheduler, request: dict[str, Any]) -> dict[str, Any]:
    exclude = set(request.get("exclude") or ())
    tasks = {}
    for key, ts in s.state.tasks.items():
        record = {
            "state": ts.state,
            "priority": list(ts.priority),
            "dependencies": [str(getattr(d, "key", d)) for d in ts.dependencies],
            "who_has": sorted(str(getattr(w, "address", w)) for w in ts.who_has or ()),
            "processing_on": str(getattr(ts.processing_on, "address", ts.processing_on))
            if ts.processing_on
            else None,
            "nbytes": ts.nbytes,
        }
        tasks[str(key)] = {k: v for k, v in record.items() if k not in exclude}
    workers = sorted(s.state.workers)
    worker_parts: dict[str, Any] = {}
    if workers:
        logs = await on_workers(s, worker_logs, (None,), workers)
        worker_parts = {a: {"logs": [list(r) for r in logs[a]]} for a in workers}
    worker_info = {a: s._worker_info(a, ws) for a, ws in s.state.workers.items()}
    gc.collect()
    return {
        "scheduler": {
            "address": s.address,
            "workers": worker_info,
            "clients": sorted(s.state.clients),
            "tasks": tasks,
            "events": {t: [list(e) for e in q] for t, q in _diag(s).events.items()},
            "logs": [list(r) for r in recent_logs()],
            "task_stream": [_stream_record(r) for r in _diag(s).task_stream],
        },
        "workers": worker_parts,
        "versions": {"scheduler": versions()},
    }


HANDLERS: dict[str, Callable[[Scheduler, dict[str, Any]], Awaitable[Any]]] = {
    "processing": op_processing,
    "nbytes": op_nbytes,
    "story": op_story,
    "events": op_events,
    "log_event": op_log_event,
    "subscribe_topic": op_subscribe_topic,
    "unsubscribe_topic": op_unsubscribe_topic,
    "scheduler_logs": op_scheduler_logs,
    "worker_logs": op_worker_logs,
    "set_metadata": op_set_metadata,
    "get_metadata": op_get_metadata,
    "task_stream": op_task_stream,
    "call_stack": op_call_stack,
    "profile": op_profile,
    "versions": op_versions,
    "benchmark_hardware": op_benchmark_hardware,
    "retire_workers": op_retire_workers,
    "restart_workers": op_restart_workers,
    "replicate": op_replicate,
    "terminate_workers": op_terminate_workers,
    "rebalance": op_rebalance,
    "amm": op_amm,
    "dump_state": op_dump_state,
}
