"""The worker's side of same-host transfers: which values go through shared memory.

The mechanics are ``wire.shm``'s and the decisions ``core.shm_policy``'s; this module
puts them together for the worker shell: share a value for a peer on this host (and
keep this worker's own copy on the segment, so the host holds the bytes once), and
recognise a failure to map a peer's segments (after which that peer's data comes
through the socket).
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from trioscheduler.core import shm_policy
from trioscheduler.server.executor import nbytes_and_type
from trioscheduler.server.memory import DataStore
from trioscheduler.wire import shm

logger = logging.getLogger("trioscheduler.worker")


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
