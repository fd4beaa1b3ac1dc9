"""The same-host shortcut: plain ``tcp://`` connections within one network namespace
go through a Unix socket.

Loopback TCP costs each side a trip through the TCP stack per write (~28 us here,
against ~10 us for a Unix socket), and a round trip between a scheduler and a worker
on one host is two of them each way. So a plain TCP listener also listens on an
*abstract* Unix socket named after its bound address (``\\0trioscheduler/127.0.0.1:8786``,
``\\0trioscheduler/0.0.0.0:8786`` for a wildcard), and ``connect`` to a plain
``tcp://`` address of this host tries that name before TCP.

Why this is safe to do behind the user's back:

* abstract names live in the network namespace, like ports: a name found is a
  listener on that port *in our namespace*, and it vanishes with its socket (no
  stale files to clean after ``kill -9``);
* only an address of this namespace is tried (loopback, or one a socket can bind);
* the connector checks the listener's uid (``SO_PEERCRED``) is its own, so another
  user cannot sit on the name; the listener serves whoever connects, as its TCP port does;
* ``tls://`` never takes the shortcut: its identity and encryption stay on TCP;
* anything unexpected (no name, refused, full backlog, a foreign uid) falls back to
  TCP, and ``TRIOSCHEDULER_UNIX_SOCKETS=0`` turns the shortcut off.

The stream over it is a ``TCPStream``: the framing is the same on any stream socket.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import sys
from typing import Any, Final

from trioscheduler.wire.stream import logger

__all__ = [
    "ENV", "bind_shortcut", "connect_shortcut", "enabled", "local_name", "names_this_host",
    "peer_name", "shortcut_name", "widen",
]  # fmt: skip

ENV: Final = "TRIOSCHEDULER_UNIX_SOCKETS"
_PREFIX: Final = b"\0trioscheduler/"
_UCRED: Final = struct.Struct("3i")  # pid, uid, gid
_WILDCARDS: Final = {4: "0.0.0.0", 6: "::"}


def enabled() -> bool:
    """Whether the shortcut is on: Linux (abstract names, ``SO_PEERCRED``) and not
    turned off."""
    if sys.platform != "linux":
        return False
    return os.environ.get(ENV, "1").strip() not in ("0", "")


def shortcut_name(host: str, port: int) -> bytes:
    """The abstract name of the listener bound to ``host:port``."""
    return _PREFIX + f"{host}:{port}".encode()


def bind_shortcut(host: str, port: int, backlog: int) -> socket.socket | None:
    """A listening Unix socket beside the TCP listener bound to ``host:port``, or
    ``None`` (off, unsupported, or the name taken: TCP alone then)."""
    if not enabled():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(shortcut_name(host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        logger.debug("no same-host shortcut for %s:%s: %s", host, port, e)
        return None
    return sock


def names_this_host(host: str) -> bool:
    """Whether ``host`` is this machine's own name (``socket.gethostname()``), which
    ``connect_shortcut`` can judge once it is resolved. Other names are left to TCP: a
    resolution per connect to another host would only cost."""
    return host.lower() == socket.gethostname().lower()


def connect_shortcut(host: str, port: int) -> socket.socket | None:
    """A connected non-blocking Unix socket to the listener of ``tcp://host:port`` in
    this network namespace, or ``None`` when TCP must be used. ``host`` is an IP
    address or ``localhost`` (this host's own name is resolved by the caller:
    ``names_this_host``)."""
    if not enabled():
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            return None
        ip = ipaddress.ip_address("127.0.0.1")
    if not ip.is_loopback and not _is_local(str(ip), ip.version):
        return None
    for name in (shortcut_name(str(ip), port), shortcut_name(_WILDCARDS[ip.version], port)):
        sock = _try_connect(name)
        if sock is not None:
            return sock
    return None


def _try_connect(name: bytes) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.connect(name)  # a Unix connect completes at once, or fails (EAGAIN: backlog full)
        _, uid, _ = _peer_credentials(sock)
    except OSError as e:
        sock.close()
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            logger.debug("same-host shortcut %r not taken: %s", name, e)
        return None
    if uid != os.getuid():
        sock.close()
        logger.debug("same-host shortcut %r belongs to uid %d, not ours: using TCP", name, uid)
        return None
    widen(sock)
    return sock


SEND_BUFFER: Final = 4 << 20


def widen(sock: Any) -> None:
    """A send buffer as large as loopback TCP's grows to (``net.ipv4.tcp_wmem``'s 4 MiB
    maximum): at the default ~200 KiB, a graph's burst of ``ComputeTask`` stalls the
    sender on every other write."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    except OSError:
        pass


def local_name() -> str:
    """How this process's end of a shortcut connection is named (``local_address``)."""
    return f"unix:pid-{os.getpid()}"


def peer_name(sock: Any) -> str:
    """How the other end of shortcut connection ``sock`` is named (in logs, a
    handler's ``peer_address``): by its process."""
    try:
        pid, _, _ = _peer_credentials(sock)
    except OSError:
        return "unix:?"
    return f"unix:pid-{pid}"


def _peer_credentials(sock: Any) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of Unix socket ``sock``."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(data)
    return pid, uid, gid


def _is_local(host: str, version: int) -> bool:
    """Whether ``host`` is an address of this network namespace (a socket can bind it)."""
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
    return True
