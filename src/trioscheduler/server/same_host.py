"""The worker's side of same-host transfers: which values go through shared memory.

The mechanics are ``wire.shm``'s and the decisions ``core.shm_policy``'s; this module
puts them together for the worker shell: place a large result in shared memory as its
task returns (``ResultPlacer``), share a value for a peer on this host (and keep this
worker's own copy on the segment, so the host holds the bytes once), and recognise a
failure to map a peer's segments (after which that peer's data comes through the
socket).
"""

from __future__ import annotations

import logging
import os
import resource
from typing import TYPE_CHECKING, Any

import trio

from trioscheduler.core import shm_policy
from trioscheduler.server.executor import Done, nbytes_and_type
from trioscheduler.server.memory import DataStore
from trioscheduler.wire import shm

if TYPE_CHECKING:
    from trioscheduler.server.worker import Worker

logger = logging.getLogger("trioscheduler.worker")

#: dask config keys (read when a worker starts; environment variables as dask's, e.g.
#: ``DASK_DISTRIBUTED__WORKER__SHARED_MEMORY__PLACE_RESULTS=never``).
PLACE_KEY = "distributed.worker.shared-memory.place-results"
THRESHOLD_KEY = "distributed.worker.shared-memory.place-results-threshold"


def placement_settings() -> tuple[str, int]:
    """``(mode, threshold in bytes)`` from the dask config; raises ``ValueError``."""
    import dask.config
    from dask.utils import parse_bytes

    raw = dask.config.get(PLACE_KEY, "auto")
    mode = str(raw).lower() if isinstance(raw, (str, bool)) else ""
    mode = {"true": "always", "false": "never"}.get(mode, mode)
    if mode not in shm_policy.PLACE_MODES:
        raise ValueError(
            f"{PLACE_KEY} is {raw!r}; use one of {', '.join(shm_policy.PLACE_MODES)} "
            "(or true/false)"
        )
    limit = dask.config.get(THRESHOLD_KEY, shm_policy.PLACE_MIN_BYTES)
    try:
        threshold = parse_bytes(limit) if isinstance(limit, str) else int(limit)
    except (TypeError, ValueError):
        raise ValueError(f"{THRESHOLD_KEY} is {limit!r}; give bytes, e.g. '16 MiB'") from None
    return mode, threshold


def hello_info(worker: Worker) -> dict[str, Any]:
    """What the worker's data server announces in its handshake: its name, and (with
    shared memory on) its host identity and pid, so that a client on this host can hand
    it large scattered buffers through shared memory (``client.transfer.scatter``)."""
    info: dict[str, Any] = {"name": worker.name}
    if worker.shared_memory:
        info["shm"] = shm.HOST_ID
        info["pid"] = os.getpid()
    return info


def adopt_all(shared: Any) -> dict[Any, Any]:
    """``{key: value}`` of the values a client on this host handed over (``update_data``'s
    ``shared``: ``{key: shm.HandOff.message}``); raises ``shm.SharedMemoryError`` if any
    cannot be mapped (nothing is kept then: the client sends them all again)."""
    if not isinstance(shared, dict):
        raise shm.SharedMemoryError("malformed update_data: 'shared' is not a dict")
    return {key: shm.adopt(message) for key, message in shared.items()}


class ResultPlacer:
    """Puts a task's large result in shared memory as the task returns, in its thread.

    Called by the worker's task threads with each finished task (``Done``) before it
    reaches the loop: the result is replaced by the same value rebuilt on segments, so
    a later fetch by a worker on this host maps it instead of copying it (and the copy
    is paid here, off the loop, by the producer). ``core.shm_policy.place_result``
    decides; ``peer_seen`` tells it this worker has a same-host peer (for ``auto``).
    """

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.mode, self.threshold = placement_settings()
        # same-host processes we exchanged data with: pid -> its start time (so a pid
        # the kernel gave to a new process is not taken for the peer)
        self.peers: dict[int, int] = {}
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.max_segments = shm_policy.max_segments(soft if soft > 0 else 1 << 16)
        if worker.shared_memory and self.mode != "never":
            shm.keep_warm(shm_policy.warm_pool_bytes(worker.memory_limit or 0))
        self._said = False

    def peer_seen(self, pid: Any) -> None:
        """A worker on this host (process ``pid``) fetched from us, or we from it, through
        shared memory."""
        if type(pid) is int and pid not in self.peers:
            started = _start_time(pid)
            if started is not None:
                self.peers[pid] = started

    def _peers_alive(self) -> bool:
        """Whether a peer seen is still there (those gone are forgotten: with ``auto``,
        a worker whose same-host peers all left stops placing its results)."""
        for pid, started in list(self.peers.items()):
            if _start_time(pid) != started:  # (task threads may do this at once)
                self.peers.pop(pid, None)
        return bool(self.peers)

    async def place_off_loop(self, done: Done) -> None:
        """``self(done)`` for an ``async def`` task, whose result arrives on the loop: the
        copy runs in a thread, the loop meanwhile goes on (the task's slot stays held)."""
        if done.nbytes >= self.threshold and done.error is None:
            try:
                await trio.to_thread.run_sync(self, done)
            except Exception:  # the task's result stays as it is
                logger.exception("placing the result of %r", done.key)

    def __call__(self, done: Done) -> None:
        if done.nbytes < self.threshold:  # most results: one comparison per task
            return
        if done.error is not None or done.rescheduled or done.coroutine is not None:
            return
        if not self.worker.shared_memory or not shm_policy.place_result(
            done.nbytes, mode=self.mode, threshold=self.threshold,
            same_host_peers=self.mode == "auto" and self._peers_alive(),
            segments=shm.owned_segments(),
            max_segments=self.max_segments,
        ):  # fmt: skip
            return
        try:
            rebuilt = shm.place(done.value, self.threshold)
        except OSError as exc:  # out of descriptors or memory: the value stays as it is
            if not self._said:
                self._said = True
                logger.warning(
                    "worker %s: placing %r in shared memory failed (%s); results stay in "
                    "private memory until a peer fetches them",
                    self.worker.address, done.key, exc,
                )  # fmt: skip
            return
        if rebuilt is not None:
            done.value = rebuilt


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot), None if it is gone (or a
    zombie: killed, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2 :].split()  # after "pid (comm) "
        if fields[0] in (b"Z", b"X"):
            return None
        return int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


async def share(
    store: DataStore, key: Any, value: Any, threshold: int, in_memory: bool, address: str
) -> Any:
    """What to send a same-host peer for ``value``: it, or its ``shm.Shared`` form.

    The first time, the large buffers are copied into segments (in a thread) and the
    store's value (if ``in_memory``, and still that value) is swapped for the one
    rebuilt on the segments. A failure to share (out of descriptors or memory) sends
    the value as it is.
    """
    if not shm_policy.share_buffer(nbytes_and_type(value)[0], threshold):
        return value
    try:
        sent, rebuilt = await trio.to_thread.run_sync(shm.share, value, threshold)
    except OSError as exc:
        logger.info("worker %s: sharing %r failed (%s); sent as is", address, key, exc)
        return value
    if rebuilt is not None and in_memory:
        store.replace(key, value, rebuilt)
    return sent


def from_shared_memory(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a failure to map a peer's segment."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, shm.SharedMemoryError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
