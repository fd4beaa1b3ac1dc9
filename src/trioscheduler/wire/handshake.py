"""The first message each side of a connection sends: protocol, version, role, info.

Both sides send their hello at once and then read the other's, so a connection costs
one round trip. Each side checks the other's version itself: the connecting side raises
``ProtocolVersionError``, the listening side logs the refusal and drops the connection,
and both messages name the two versions.

The hello is plain msgpack, encoded and decoded here and nowhere else: no extension
type is accepted, so nothing a stranger sends before it has identified itself (and,
with TLS, before the TLS handshake authenticated it) can reach ``pickle.loads``. Only
after ``check_hello`` does a connection use ``serialize.loads``.

A listener that refuses a peer it can still talk to (plain tcp on a TLS port) sends
a *refusal* in place of its hello: ``{"protocol", "version", "error"}``; the peer's
``connect`` raises ``ConnectError`` with that text at once.
"""

from __future__ import annotations

from typing import Any, Final

import msgpack

from trioscheduler.wire.stream import ConnectError, ProtocolError, ProtocolVersionError

PROTOCOL: Final = "trioscheduler"
#: Bump on any incompatible change of framing or serialization.
PROTOCOL_VERSION: Final = 3


def make_hello(role: str, info: dict[str, Any] | None, version: int = PROTOCOL_VERSION) -> dict[str, Any]:
    return {"protocol": PROTOCOL, "version": version, "role": role, "info": dict(info or {})}


def refusal(message: str) -> dict[str, Any]:
    return {"protocol": PROTOCOL, "version": PROTOCOL_VERSION, "error": message}


def pack_hello(hello: dict[str, Any]) -> bytes:
    """The hello as msgpack; values msgpack cannot say (an odd worker name) go as ``str``."""
    return msgpack.packb(hello, default=str, use_bin_type=True)  # type: ignore[no-any-return]


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"extension type {code} in a handshake (only plain msgpack is accepted)")


def unpack_hello(frames: list[Any], peer: str) -> Any:
    """Decode a hello: one frame of plain msgpack, never anything that unpickles."""
    if len(frames) != 1:
        raise ProtocolError(
            f"{peer} is not a trioscheduler peer (a handshake of {len(frames)} frames; "
            "it is one frame of plain msgpack)"
        )
    try:
        return msgpack.unpackb(bytes(frames[0]), ext_hook=_no_ext, raw=False, strict_map_key=True)
    except ProtocolError as e:
        raise ProtocolError(f"{peer} is not a trioscheduler peer: {e}") from None
    except Exception as e:
        raise ProtocolError(
            f"{peer} is not a trioscheduler peer (undecodable handshake: {type(e).__name__})"
        ) from None


def check_hello(hello: Any, peer: str) -> tuple[str, dict[str, Any]]:
    """``(role, info)`` of a valid hello from ``peer``; raises on anything else."""
    if not isinstance(hello, dict) or hello.get("protocol") != PROTOCOL:
        raise ProtocolError(f"{peer} is not a trioscheduler peer (bad handshake {hello!r:.100})")
    if "error" in hello:
        raise ConnectError(f"{peer} refused the connection: {hello['error']!s:.500}")
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
