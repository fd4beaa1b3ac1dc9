"""When a value goes through shared memory instead of the socket, and how it is counted.

Pure decisions (no files, no sockets): the mechanics live in ``wire.shm``. Shared memory
is used only between processes that announced the same host identity (same kernel boot,
same pid namespace, same user), and only for buffers large enough that one mapping costs
less than sending the bytes: a mapping costs a few system calls and a page-table entry per
page, the socket a copy on each side.
"""

from __future__ import annotations

from typing import Final

#: Out-of-band buffers at least this large travel through shared memory (same host only).
SHM_MIN_BYTES: Final = 1 << 20

#: A task's result whose buffers reach this size is put in shared memory as the task
#: returns (``place_result``), so that a transfer on this host is a mapping. Larger than
#: ``SHM_MIN_BYTES``: each placed result holds a segment (and its descriptors) while it
#: lives, and a result never fetched paid its copy for nothing.
PLACE_MIN_BYTES: Final = 16 << 20

#: Free segments a process keeps warm for reuse, at least (``warm_pool_bytes``).
WARM_POOL_BYTES: Final = 256 << 20

#: ``distributed.worker.shared-memory.place-results``: ``auto`` places results once the
#: worker has exchanged data with a worker on its own host; ``always``; ``never``.
PLACE_MODES: Final = ("auto", "always", "never")


def use_shared_memory(
    local_host: str | None,
    peer_host: object,
    enabled: bool = True,
    local_pid: int = 0,
    peer_pid: object = None,
) -> bool:
    """Whether a reply to ``peer_host`` may carry shared-memory references at all.

    ``None`` on either side means "no shared memory here" (not Linux, no ``memfd``, or
    switched off); a peer's identity that is not a non-empty string is never trusted to
    match. A peer in this very process (``peer_pid == local_pid``) shares our memory
    already: it gets the value itself (over ``inproc`` by reference).
    """
    return (
        enabled
        and local_host is not None
        and isinstance(peer_host, str)
        and bool(peer_host)
        and peer_host == local_host
        and peer_pid != local_pid
    )


def share_buffer(nbytes: int, threshold: int = SHM_MIN_BYTES) -> bool:
    """Whether one out-of-band buffer of ``nbytes`` goes through shared memory."""
    return threshold >= 0 and nbytes >= max(threshold, 1)


def process_memory(rss: int, rss_shared: int, owned_shared: int) -> int:
    """A process's memory with each shared segment counted once per host.

    ``rss`` counts every shared page a process has touched, so a 200 MB array mapped by
    three workers would look like 600 MB. Instead each segment is counted by the process
    that created it, while it holds it (``owned_shared``), whether it maps the segment or
    not (a segment kept warm for reuse is mapped by nobody, and its pages are memory all
    the same); pages it merely maps from others are not its memory.
    """
    return max(0, rss - rss_shared) + max(0, owned_shared)


def place_result(
    nbytes: int,
    *,
    mode: str,
    threshold: int,
    same_host_peers: bool,
    segments: int,
    max_segments: int,
) -> bool:
    """Whether a task's result of ``nbytes`` (``sizeof``) goes into shared memory as it returns.

    Only if placing is on (``mode``: ``always``, or ``auto`` once a worker on this host
    is known to exchange data with this one), the result is large enough, and the
    process holds fewer than ``max_segments`` segments (each costs file descriptors).
    """
    if mode == "never" or (mode == "auto" and not same_host_peers):
        return False
    return share_buffer(nbytes, threshold) and segments < max_segments


def release_free_segments(process_memory: int, memory_limit: int, target: float | None) -> bool:
    """Whether to close the segments kept warm for reuse: when the process is above its
    memory target (they count as its memory; spilling a value frees its segment into
    that pool, which must not keep the memory the spill was for)."""
    return bool(memory_limit) and target is not None and process_memory > target * memory_limit


def warm_pool_bytes(memory_limit: int) -> int:
    """Bytes of free segments a worker keeps warm for its next results: an eighth of its
    memory limit, so that a result larger than the default 256 MiB finds its segment
    warm too (the memory monitor closes them when the worker is above its target); the
    default without a limit."""
    return max(WARM_POOL_BYTES, memory_limit // 8) if memory_limit > 0 else WARM_POOL_BYTES


def max_segments(open_files_limit: int) -> int:
    """Segments a process may hold for placed results: each holds up to four descriptors
    (its own, a mapping's, and the copies ``mmap`` keeps), so a quarter of the limit."""
    return max(0, open_files_limit // 16)
