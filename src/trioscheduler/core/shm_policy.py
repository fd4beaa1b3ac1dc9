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
    that created it, while it holds it (``owned_shared``); pages it merely maps from
    others (``rss_shared`` minus its own) are not its memory.
    """
    return max(0, rss - rss_shared + min(owned_shared, rss_shared))
