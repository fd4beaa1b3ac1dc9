"""TLS on real sockets: mutual authentication, refusals with clear errors, big frames."""

from __future__ import annotations

import logging
import pickle
import ssl
from pathlib import Path

import numpy as np
import pytest
import trio

from trioscheduler import Security
from trioscheduler.wire import ConnectError, Stream, connect, listen
from trioscheduler.wire.security import SecurityError

pytest.importorskip("cryptography")


@pytest.fixture(scope="module")
def sec() -> Security:
    return Security.temporary()


@pytest.fixture(scope="module")
def other() -> Security:
    """A cluster with another CA: its certificates mean nothing to ``sec``."""
    return Security.temporary()


async def echo(stream: Stream) -> None:
    async for msg in stream:
        await stream.send(msg)


def wire_logs(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "trioscheduler.wire")


async def logged(caplog: pytest.LogCaptureFixture, text: str) -> None:
    """Until the listener's side has logged ``text`` (it runs concurrently with ours)."""
    with trio.fail_after(10):
        while text not in wire_logs(caplog):  # noqa: ASYNC110 - a log, no event to wait on
            await trio.sleep(0.01)


async def test_tls_round_trip_and_large_array(sec: Security) -> None:
    arr = np.arange(5_000_000, dtype="i8")  # 40 MB: many TLS records
    async with listen("tls://127.0.0.1:0", echo, **sec.get_listen_args("scheduler")) as lst:
        assert lst.address.startswith("tls://127.0.0.1:")
        stream = await connect(lst.address, **_conn(sec, "client"))
        async with stream:
            assert stream.peer_role == "scheduler"
            await stream.send({"op": "ping", "key": ("x", 1)})
            assert await stream.receive() == {"op": "ping", "key": ("x", 1)}
            await stream.send(arr)
            assert np.array_equal(await stream.receive(), arr)


def _conn(sec: Security, role: str) -> dict[str, object]:
    args = sec.get_connection_args(role)
    args.pop("extra_conn_args")
    return args


async def test_wrong_certificate_is_refused_on_both_sides(
    sec: Security, other: Security, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "trioscheduler.wire")
    async with listen("tls://127.0.0.1:0", echo, **sec.get_listen_args("scheduler")) as lst:
        with pytest.raises(ConnectError, match="TLS handshake failed"):
            await connect(lst.address, timeout=5, **_conn(other, "client"))
        # the listener still serves the right peer
        async with await connect(lst.address, **_conn(sec, "client")) as stream:
            await stream.send("still here")
            assert await stream.receive() == "still here"
        await logged(caplog, "TLS handshake failed")


async def test_client_without_certificate_is_refused(
    sec: Security, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "trioscheduler.wire")
    # A client that trusts the CA but presents no certificate of its own.
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=sec.tls_ca_file)
    ctx.check_hostname = False
    async with listen("tls://127.0.0.1:0", echo, **sec.get_listen_args("scheduler")) as lst:
        with pytest.raises(ConnectError, match="TLS handshake failed|refused"):
            await connect(lst.address, timeout=5, ssl_context=ctx)
        await logged(caplog, "TLS handshake failed")
    assert "certificate" in wire_logs(caplog).lower()


async def test_plain_tcp_against_tls_is_refused_clearly(
    sec: Security, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "trioscheduler.wire")
    async with listen("tls://127.0.0.1:0", echo, **sec.get_listen_args("scheduler")) as lst:
        plain = lst.address.replace("tls://", "tcp://")
        with trio.fail_after(5):  # a refusal, not a retry until the time-out
            with pytest.raises(ConnectError, match="accepts TLS only"):
                await connect(plain, timeout=30)
        await logged(caplog, "spoke plain tcp to a TLS listener")


async def test_tls_client_against_plain_listener_is_refused_clearly(
    sec: Security, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "trioscheduler.wire")
    async with listen("tcp://127.0.0.1:0", echo) as lst:
        tls = lst.address.replace("tcp://", "tls://")
        with trio.fail_after(5), pytest.raises(ConnectError, match="TLS handshake failed"):
            await connect(tls, timeout=30, **_conn(sec, "client"))
        await logged(caplog, "started a TLS handshake on a plain tcp:// listener")


async def test_tls_address_without_certificates_says_what_is_missing() -> None:
    with pytest.raises(SecurityError, match="tls:// needs certificates"):
        async with listen("tls://127.0.0.1:0", echo):
            pass
    with pytest.raises(SecurityError, match="tls:// needs certificates"):
        await connect("tls://127.0.0.1:1")


async def test_require_encryption_refuses_plain_tcp(sec: Security) -> None:
    with pytest.raises(SecurityError, match="require_encryption"):
        async with listen("tcp://127.0.0.1:0", echo, **sec.get_listen_args("scheduler")):
            pass
    with pytest.raises(SecurityError, match="require_encryption"):
        await connect("tcp://127.0.0.1:1", **_conn(sec, "client"))


async def test_pickle_before_tls_handshake_never_runs(
    sec: Security, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from _wire_attack import Boom, pickle_before_hello

    marker = tmp_path / "ran"
    async with listen("tls://127.0.0.1:0", echo, **sec.get_listen_args("scheduler")) as lst:
        host, port = lst.address.removeprefix("tls://").rsplit(":", 1)
        await pickle_before_hello(host, int(port), marker)
        async with await connect(lst.address, **_conn(sec, "client")) as stream:
            await stream.send("served")
            assert await stream.receive() == "served"
    assert not marker.exists()
    pickle.loads(pickle.dumps(Boom(marker)))  # the payload really runs code when loaded
    assert marker.exists()


def test_security_fields_and_config(tmp_path: Path) -> None:
    import dask.config

    s = Security()
    assert not s.require_encryption and s.tls_ca_file is None
    assert s.get_connection_args("client")["ssl_context"] is None
    with dask.config.set({"distributed.comm.tls.ca-file": "/nowhere/ca.pem",
                          "distributed.comm.require-encryption": True}):  # fmt: skip
        c = Security()
    assert c.tls_ca_file == "/nowhere/ca.pem" and c.require_encryption
    with pytest.raises(TypeError, match="unknown parameters.*tls_bogus"):
        Security(tls_bogus=1)
    t = Security.temporary()
    assert t.require_encryption
    assert "Temporary (In-memory)" in repr(t)
    assert Security(**t.to_dict()) == t
    # paths work as well as PEM text
    for field in ("tls_ca_file", "tls_client_cert", "tls_client_key"):
        (tmp_path / field).write_text(getattr(t, field))
    f = Security(**{k: str(tmp_path / k) for k in ("tls_ca_file", "tls_client_cert", "tls_client_key")})
    assert isinstance(f.get_connection_args("client")["ssl_context"], ssl.SSLContext)
    with pytest.raises(SecurityError, match="cannot load the TLS files"):
        Security(tls_ca_file=str(tmp_path / "missing"), tls_client_cert="x").get_connection_args(
            "client"
        )
