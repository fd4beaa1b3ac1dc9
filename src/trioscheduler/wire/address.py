"""Addresses: ``tcp://host:port``, ``tls://host:port`` and ``inproc://name``, parsed in one place."""

from __future__ import annotations

import socket
from typing import Final

from trioscheduler.errors import TrioSchedulerError

SCHEMES: Final = ("tcp", "tls", "inproc")


class AddressError(TrioSchedulerError, ValueError):
    """An address that is not ``tcp://host:port``, ``tls://host:port`` or ``inproc://name``."""


def parse_address(address: str) -> tuple[str, str, int | None]:
    """``(scheme, host_or_name, port_or_None)``.

    A bare ``host:port`` means TCP, as in dask. IPv6 hosts are written in brackets
    (``tcp://[::1]:8786``) and returned without them. ``tls`` is TCP with TLS on top:
    the same host and port rules.
    """
    if not isinstance(address, str):
        raise AddressError(f"an address must be a string, not {type(address).__name__}")
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "tcp", address
    if scheme not in SCHEMES:
        raise AddressError(
            f"unsupported scheme {scheme!r} in address {address!r}; "
            f"use one of {', '.join(s + '://' for s in SCHEMES)}"
        )
    if scheme == "inproc":
        return "inproc", rest, None
    if rest.startswith("["):
        host, bracket, port_text = rest[1:].partition("]")
        if not bracket or not port_text.startswith(":"):
            raise AddressError(f"bad IPv6 address {address!r}; expected {scheme}://[host]:port")
        port_text = port_text[1:]
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon:
            raise AddressError(f"address {address!r} has no port; expected {scheme}://host:port")
    if not host:
        raise AddressError(f"address {address!r} has no host; expected {scheme}://host:port")
    try:
        port = int(port_text)
    except ValueError:
        raise AddressError(f"bad port {port_text!r} in address {address!r}") from None
    if not 0 <= port <= 65535:
        raise AddressError(f"port {port} out of range in address {address!r}")
    return scheme, host, port


def tcp_address(host: str, port: int, scheme: str = "tcp") -> str:
    """The ``tcp://`` (or ``tls://``) spelling of a socket address (brackets around IPv6)."""
    if ":" in host:
        return f"{scheme}://[{host}]:{port}"
    return f"{scheme}://{host}:{port}"


def default_host(scheduler_address: str) -> str:
    """The interface to serve data on: loopback for a local scheduler, else the one
    this machine uses to reach the scheduler (so peers on other hosts can connect)."""
    scheme, host, port = parse_address(scheduler_address)
    if scheme not in ("tcp", "tls") or host in ("localhost", "127.0.0.1", "::1", "0.0.0.0", ""):
        return "127.0.0.1"
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, port or 80))
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"
