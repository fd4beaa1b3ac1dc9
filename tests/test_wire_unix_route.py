"""The same-host shortcut: which ``tcp://`` connections go through a Unix socket, and
that nothing reaches a listener it should not (wire/unix_route.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import trio

from trioscheduler import Security
from trioscheduler.wire import ConnectError, Stream, connect, listen
from trioscheduler.wire.address import parse_address
from trioscheduler.wire.unix_route import ENV, connect_shortcut, shortcut_name


async def echo(stream: Stream) -> None:
    async for msg in stream:
        await stream.send(msg)


def port_of(address: str) -> int:
    port = parse_address(address)[2]
    assert port is not None
    return port


@pytest.fixture(autouse=True)
def _shortcut_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "1")


async def test_a_loopback_connection_takes_the_shortcut_and_large_frames_cross_it() -> None:
    arr = np.arange(3_000_000, dtype="i8")  # 24 MB: many partial writes on a Unix socket
    seen: list[str] = []

    async def keep(stream: Stream) -> None:
        seen.append(stream.peer_address)
        await stream.send(await stream.receive())

    async with listen("tcp://127.0.0.1:0", keep) as lst:
        async with await connect(lst.address) as stream:
            assert stream.local_address == f"unix:pid-{os.getpid()}"
            assert stream.peer_address == lst.address  # the address asked for, as over TCP
            await stream.send(arr)
            assert np.array_equal(await stream.receive(), arr)
        assert seen == [f"unix:pid-{os.getpid()}"]
    # closed with its listener: a name left behind would route the next one astray
    assert connect_shortcut("127.0.0.1", port_of(lst.address)) is None


async def test_a_wildcard_listener_is_reached_by_loopback_and_by_a_local_address() -> None:
    async with listen("tcp://0.0.0.0:0", echo) as lst:
        port = port_of(lst.address)
        async with await connect(f"tcp://127.0.0.1:{port}") as stream:
            assert stream.local_address.startswith("unix:")
            await stream.send("hello")
            assert await stream.receive() == "hello"
        host = _an_address_of_this_host()
        if host is not None:
            async with await connect(f"tcp://{host}:{port}") as stream:
                assert stream.local_address.startswith("unix:")


async def test_a_host_name_of_this_host_takes_the_shortcut() -> None:
    name = socket.gethostname()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET)}
    except OSError:
        pytest.skip(f"this host's name {name!r} does not resolve")
    if not any(_bindable(a) for a in addresses):
        pytest.skip(f"{name!r} resolves to {addresses}, none of this namespace")
    async with listen("tcp://0.0.0.0:0", echo) as lst:
        port = port_of(lst.address)
        async with await connect(f"tcp://{name}:{port}") as stream:
            assert stream.local_address.startswith("unix:")
            assert stream.peer_address == f"tcp://{name}:{port}"
            await stream.send("hello")
            assert await stream.receive() == "hello"


def _bindable(address: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


def _an_address_of_this_host() -> str | None:
    """A non-loopback IPv4 address of this network namespace, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
        except OSError:
            return None
        host = str(s.getsockname()[0])
    return None if host.startswith("127.") or host == "0.0.0.0" else host


async def test_an_address_of_another_host_never_reaches_a_local_listener_on_its_port() -> None:
    # A local listener on every interface and port P; tcp://192.0.2.1:P (TEST-NET, no
    # such host here) must go to that host or fail, never to the local listener.
    async with listen("tcp://0.0.0.0:0", echo) as lst:
        port = port_of(lst.address)
        assert connect_shortcut("192.0.2.1", port) is None
        with pytest.raises(ConnectError, match="192.0.2.1"):
            await connect(f"tcp://192.0.2.1:{port}", timeout=0.5)


async def test_a_listener_bound_to_one_address_is_not_reached_through_another() -> None:
    async with listen("tcp://127.0.0.2:0", echo) as lst:
        port = port_of(lst.address)
        assert connect_shortcut("127.0.0.2", port) is not None
        assert connect_shortcut("127.0.0.1", port) is None  # TCP would be refused too
        with pytest.raises(ConnectError):
            await connect(f"tcp://127.0.0.1:{port}", timeout=0.3)


async def test_tls_never_takes_the_shortcut() -> None:
    sec = Security.temporary()
    async with listen("tls://127.0.0.1:0", echo, **sec.get_listen_args("scheduler")) as lst:
        assert connect_shortcut("127.0.0.1", port_of(lst.address)) is None  # no name at all
        args = sec.get_connection_args("client")
        del args["extra_conn_args"]
        async with await connect(lst.address, **args) as stream:
            assert stream.local_address.startswith("tls://")
            await stream.send("secret")
            assert await stream.receive() == "secret"


async def test_turned_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    async with listen("tcp://127.0.0.1:0", echo) as lst:
        monkeypatch.setenv(ENV, "0")
        async with await connect(lst.address) as stream:
            assert stream.local_address.startswith("tcp://")


@contextmanager
def another_user_listening_on(name: bytes) -> Iterator[None]:
    """A process of user ``nobody`` holding the abstract Unix socket ``name``."""
    impostor = subprocess.Popen(
        [sys.executable, "-c", _IMPOSTOR, repr(name)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert impostor.stdout is not None and impostor.stdout.readline() == b"ready\n"
        yield
    finally:
        impostor.kill()
        impostor.wait()


_IMPOSTOR = textwrap.dedent(
    """
    import ast, os, socket, sys
    os.setgid(65534); os.setuid(65534)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(ast.literal_eval(sys.argv[1])); s.listen(8)
    print("ready", flush=True)
    sys.stdin.read()
    """
)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
async def test_a_name_held_by_another_user_is_not_trusted() -> None:
    # Another user takes the name of our port before our listener does; our listener
    # then serves TCP alone, and a connector must reach it over TCP, not the impostor.
    served: list[str] = []

    async def mark(stream: Stream) -> None:
        served.append(stream.peer_address)
        await echo(stream)

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as reserve:
        reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reserve.bind(("127.0.0.1", 0))  # not listening: our listener can bind it too
        port = reserve.getsockname()[1]
        with another_user_listening_on(shortcut_name("127.0.0.1", port)):
            async with listen(f"tcp://127.0.0.1:{port}", mark) as lst:
                async with await connect(lst.address) as stream:
                    assert stream.local_address.startswith("tcp://127.0.0.1:")
                    await stream.send("to the real one")
                    assert await stream.receive() == "to the real one"
    assert served and served[0].startswith("tcp://")


async def test_a_full_backlog_falls_back_to_tcp() -> None:
    # A listener that does not accept (a stalled scheduler): once the Unix backlog is
    # full, connecting goes over TCP rather than failing.
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with socket.socket() as tcp:
        tcp.bind(("127.0.0.1", 0))
        port = tcp.getsockname()[1]
        unix.bind(shortcut_name("127.0.0.1", port))
        unix.listen(0)
        held = [connect_shortcut("127.0.0.1", port) for _ in range(3)]
        assert held[0] is not None
        assert held[-1] is None
        for s in held:
            if s is not None:
                s.close()
    unix.close()
    await trio.lowlevel.checkpoint()
