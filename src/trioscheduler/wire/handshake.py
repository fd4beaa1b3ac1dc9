"""The first message each side of a connection sends: protocol, version, role, info.

Both sides send their hello at once and then read the other's, so a connection costs
one round trip. Each side checks the other's version itself: the connecting side raises
``ProtocolVersionError``, the listening side logs the refusal and drops the connection,
and both messages name the two versions.
"""

from __future__ import annotations

from typing import Any, Final

from trioscheduler.wire.stream import ProtocolError, ProtocolVersionError

PROTOCOL: Final = "trioscheduler"
#: Bump on any incompatible change of framing or serialization.
PROTOCOL_VERSION: Final = 1


def make_hello(role: str, info: dict[str, Any] | None, version: int = PROTOCOL_VERSION) -> dict[str, Any]:
    return {"protocol": PROTOCOL, "version": version, "role": role, "info": dict(info or {})}


def check_hello(hello: Any, peer: str) -> tuple[str, dict[str, Any]]:
    """``(role, info)`` of a valid hello from ``peer``; raises on anything else."""
    if not isinstance(hello, dict) or hello.get("protocol") != PROTOCOL:
        raise ProtocolError(f"{peer} is not a trioscheduler peer (bad handshake {hello!r:.100})")
    version = hello.get("version")
    if version != PROTOCOL_VERSION:
        raise ProtocolVersionError(
            f"{peer} speaks trioscheduler wire protocol version {version!r}, "
            f"this process speaks version {PROTOCOL_VERSION}; run the same trioscheduler "
            "version on every machine"
        )
    role, info = hello.get("role"), hello.get("info")
    if not isinstance(role, str) or not isinstance(info, dict):
        raise ProtocolError(f"{peer} sent a malformed handshake {hello!r:.100}")
    return role, info
