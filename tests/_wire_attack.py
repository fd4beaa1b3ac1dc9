"""A stranger's bytes: a header whose extension type points at a pickle frame, sent
before any hello. The pickle, if ever loaded, creates ``marker``: proof that code ran."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import msgpack
import trio

from trioscheduler.wire.handshake import make_hello, pack_hello
from trioscheduler.wire.tcp import frame_prefix
from trioscheduler.wire.unix_route import connect_shortcut

_HELLO_HEADER = pack_hello(make_hello("client", {}))
HELLO = frame_prefix([_HELLO_HEADER]) + _HELLO_HEADER  # a valid hello, as a stranger sends it
_PICKLE_EXT = 6  # serialize._PICKLE: "the object is pickled in the frames that follow"


class Boom:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.path), "w")  # unpickling creates the file


def attack_bytes(marker: Path) -> bytes:
    header = msgpack.packb(msgpack.ExtType(_PICKLE_EXT, struct.pack("<II", 0, 1)))
    payload = pickle.dumps(Boom(marker))
    return frame_prefix([header, payload]) + header + payload


async def pickle_before_hello(host: str, port: int, marker: Path, via: str = "tcp") -> bytes:
    """Send the attack on a bare socket and read until the listener hangs up; ``via``
    ``unix``: through the listener's same-host shortcut (wire/unix_route.py)."""
    if via == "unix":
        raw = connect_shortcut(host, port)
        assert raw is not None, f"no same-host shortcut for {host}:{port}"
        sock = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
    else:
        sock = await trio.open_tcp_stream(host, port)
    received = bytearray()
    with trio.fail_after(30):
        try:
            await sock.send_all(attack_bytes(marker))
            while chunk := await sock.receive_some():
                received += chunk
        except trio.BrokenResourceError:
            pass  # reset by the listener: it hung up too
        finally:
            await sock.aclose()
    return bytes(received)
