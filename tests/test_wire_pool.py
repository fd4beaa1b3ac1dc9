"""The connection pool: reuse, limits, and never handing out a broken connection."""

from __future__ import annotations

import pytest
import trio

from trioscheduler.wire import ConnectionPool, Stream, listen

pytestmark = pytest.mark.parametrize("transport", ["tcp", "inproc"])


def any_address(transport: str) -> str:
    return "tcp://127.0.0.1:0" if transport == "tcp" else "inproc://"


class Server:
    """Echo server that counts connections (total and at once)."""

    def __init__(self) -> None:
        self.accepted = 0
        self.open = 0
        self.most_open = 0
        self.hung_up = trio.Event()

    async def __call__(self, stream: Stream) -> None:
        self.accepted += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            async for msg in stream:
                if msg == "hang up":
                    self.hung_up.set()
                    return
                await stream.send(msg)
        finally:
            self.open -= 1


async def request(pool: ConnectionPool, address: str, msg: object) -> object:
    async with pool.connect(address) as stream:
        await stream.send(msg)
        return await stream.receive()


async def test_idle_connections_are_reused(transport: str) -> None:
    server = Server()
    async with listen(any_address(transport), server) as lst, ConnectionPool() as pool:
        for i in range(10):
            assert await request(pool, lst.address, i) == i
        assert server.accepted == 1
        assert (pool.open, pool.idle) == (1, 1)


async def test_a_stream_whose_block_raised_is_never_handed_out_again(transport: str) -> None:
    server = Server()
    async with listen(any_address(transport), server) as lst, ConnectionPool() as pool:
        with pytest.raises(RuntimeError):
            async with pool.connect(lst.address) as first:
                await first.send("half a request")
                raise RuntimeError("caller failed mid-way")
        assert first.closed
        async with pool.connect(lst.address) as second:
            assert second is not first
            await second.send("fresh")
            assert await second.receive() == "fresh"
        assert server.accepted == 2


async def test_a_connection_the_peer_closed_is_replaced(transport: str) -> None:
    server = Server()
    async with listen(any_address(transport), server) as lst, ConnectionPool() as pool:
        async with pool.connect(lst.address) as stream:
            await stream.send("hang up")
        with trio.fail_after(10):
            await server.hung_up.wait()
        await trio.sleep(0.05)  # the listener closes the connection right after the handler
        assert await request(pool, lst.address, "again") == "again"
        assert server.accepted == 2


async def test_open_connections_stay_within_the_limit(transport: str) -> None:
    server = Server()
    async with listen(any_address(transport), server) as lst, ConnectionPool(limit=3) as pool:
        results: list[object] = []

        async def slow_request(i: int) -> None:
            async with pool.connect(lst.address) as stream:
                assert pool.open <= 3
                await trio.sleep(0.01)
                await stream.send(i)
                results.append(await stream.receive())

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(slow_request, i)
        assert sorted(results) == list(range(20))  # type: ignore[type-var]
        assert server.most_open <= 3


async def test_idle_connection_to_another_address_makes_room(transport: str) -> None:
    a, b = Server(), Server()
    async with (
        listen(any_address(transport), a) as la,
        listen(any_address(transport), b) as lb,
        ConnectionPool(limit=1) as pool,
    ):
        with trio.fail_after(10):
            assert await request(pool, la.address, "to a") == "to a"
            assert await request(pool, lb.address, "to b") == "to b"
            assert await request(pool, la.address, "a again") == "a again"
        assert pool.open == 1


async def test_closed_pool_refuses_and_closes_idle(transport: str) -> None:
    server = Server()
    async with listen(any_address(transport), server) as lst:
        pool = ConnectionPool()
        await request(pool, lst.address, 1)
        await pool.aclose()
        assert pool.open == 0
        with pytest.raises(trio.ClosedResourceError):
            await request(pool, lst.address, 2)
