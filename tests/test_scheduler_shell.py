"""The Scheduler shell: connections by first message, routing of effects, RPC, recording.

Peers here are raw wire streams speaking the protocol by hand (a "worker" that answers
ComputeTask itself), next to a real Client, so each rule of the shell is visible.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio

from polling import wait_until
from trioscheduler import Client, Scheduler, Worker, wire
from trioscheduler.core import messages as m
from trioscheduler.core import recorder
from trioscheduler.server import event_log
from trioscheduler.wire.local_alias import local_route

TIMEOUT = 20


@pytest.fixture(params=["inproc", "tcp"])
def address(request: pytest.FixtureRequest) -> str:
    if request.param == "inproc":
        return f"inproc://test-shell-{os.getpid()}-{request.node.name}"
    return "tcp://127.0.0.1:0"



def add_worker(addr: str, nthreads: int = 1, name: str | None = None) -> m.AddWorker:
    return m.AddWorker("test", 0.0, addr, nthreads, 0, {}, name)


async def rpc(address: str, request: dict[str, Any]) -> Any:
    stream = await wire.connect(address, role="test")
    async with stream:
        await stream.send(request)
        return await stream.receive()


def inc(x: int) -> int:
    return x + 1


async def test_worker_stream_registers_and_is_removed_when_broken(address: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with Scheduler(address) as s:
            stream = await wire.connect(s.address, role="worker")
            await stream.send(add_worker("fake://w1", 3, "w1"))
            await wait_until(lambda: "fake://w1" in s.state.workers)
            reply = await rpc(s.address, {"op": "identity"})
            assert reply["status"] == "OK"
            info = reply["result"]["workers"]["fake://w1"]
            assert info["nthreads"] == 3 and info["name"] == "w1" and info["status"] == "running"
            await stream.aclose()
            await wait_until(lambda: "fake://w1" not in s.state.workers)


async def test_effects_are_routed_to_worker_and_client(address: str) -> None:
    """A hand-written worker gets ComputeTask; its TaskFinished reaches the client."""
    with trio.fail_after(TIMEOUT):
        async with Scheduler(address) as s:
            worker = await wire.connect(s.address, role="worker")
            await worker.send(add_worker("fake://w2", 1))
            await wait_until(lambda: "fake://w2" in s.state.workers)
            async with Client(s.address, asynchronous=True) as c:
                f = c.submit(inc, 1)
                msg = await worker.receive()
                assert type(msg) is m.ComputeTask and msg.key == f.key
                await worker.send(m.TaskFinished("done", 0.0, "fake://w2", f.key, 28, "int"))
                await wait_until(lambda: f.status == "finished")
                assert f.type == "int"
                assert (await c.who_has(f)) == {f.key: ["fake://w2"]}
            # The client left: the scheduler frees the key on the worker.
            msg = await worker.receive()
            assert type(msg) is m.FreeKeys and f.key in msg.keys
            await worker.send(m.RemoveWorker("bye", 0.0, "fake://w2", expected=True, reason="done"))
            await wait_until(lambda: not s.state.workers)


async def test_malformed_input_closes_only_that_connection(address: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with Scheduler(address) as s:
            junk = await wire.connect(s.address, role="test")
            await junk.send(["not", "a", "known", "message"])
            with pytest.raises((trio.EndOfChannel, trio.BrokenResourceError)):
                await junk.receive()

            liar = await wire.connect(s.address, role="worker")
            await liar.send(add_worker("fake://liar", 1))
            await wait_until(lambda: "fake://liar" in s.state.workers)
            await liar.send(m.TaskFinished("x", 0.0, "fake://someone-else", "k", 1))
            with pytest.raises((trio.EndOfChannel, trio.BrokenResourceError)):
                while True:  # a CloseWorker or nothing, then the end
                    await liar.receive()
            await wait_until(lambda: "fake://liar" not in s.state.workers)

            twin = await wire.connect(s.address, role="worker")
            await twin.send(add_worker("fake://a", 1))
            await wait_until(lambda: "fake://a" in s.state.workers)
            dup = await wire.connect(s.address, role="worker")
            await dup.send(add_worker("fake://a", 1))
            with pytest.raises((trio.EndOfChannel, trio.BrokenResourceError)):
                await dup.receive()
            assert "fake://a" in s.state.workers  # the first one is untouched

            reply = await rpc(s.address, {"op": "no-such-op"})
            assert reply["status"] == "error" and "no-such-op" in reply["text"]

            async with Client(s.address, asynchronous=True) as c:  # still serving
                assert (await c.scheduler_info())["address"] == s.address


async def test_silent_worker_times_out_and_is_told_to_close(address: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with Scheduler(address, worker_timeout=0.3, tick_interval=0.05) as s:
            stream = await wire.connect(s.address, role="worker")
            await stream.send(add_worker("fake://quiet", 1))
            msg = await stream.receive()
            assert type(msg) is m.CloseWorker and "heartbeat" in msg.reason
            assert "fake://quiet" not in s.state.workers


async def test_wait_for_workers_rpc_waits_for_a_worker(address: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with Scheduler(address) as s:
            result: list[Any] = []

            async def waiter() -> None:
                result.append(await rpc(s.address, {"op": "wait_for_workers", "n_workers": 1}))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)
                await trio.sleep(0.02)
                assert not result
                w = await wire.connect(s.address, role="worker")
                await w.send(add_worker("fake://late", 2))
            assert result == [{"status": "OK", "result": 1}]
            await w.aclose()


async def test_record_writes_every_event(tmp_path: Path, address: str) -> None:
    path = tmp_path / "events.msgpack"
    with trio.fail_after(TIMEOUT):
        async with Scheduler(address, record=path, tick_interval=0.01, validate=True) as s:
            w = await wire.connect(s.address, role="worker")
            await w.send(add_worker("fake://rec", 1))
            async with Client(s.address, asynchronous=True) as c:
                f = c.submit(inc, 1)
                await w.receive()
                await w.send(m.TaskFinished("t", 0.0, "fake://rec", f.key, 28))
                await wait_until(lambda: f.done())
            await w.aclose()
            await wait_until(lambda: not s.state.workers)
            await trio.sleep(0.05)  # a few ticks (the rest can take less than one)
        live = recorder.snapshot(s.state)
    log = event_log.load_log(path)
    assert log[0][0] == recorder.HEADER_TAG
    events = [m.load(x) for x in log[1:]]
    kinds = [type(e) for e in events]
    for kind in (m.AddWorker, m.AddClient, m.UpdateGraph, m.TaskFinished, m.RemoveClient, m.Tick):
        assert kind in kinds
    assert kinds.index(m.AddWorker) < kinds.index(m.UpdateGraph) < kinds.index(m.TaskFinished)
    removed = [e for e in events if type(e) is m.RemoveWorker]
    assert removed and removed[0].expected is False
    assert recorder.snapshot(recorder.replay(log)) == live  # the log rebuilds the state


async def test_address_in_use_is_a_plain_os_error() -> None:
    with trio.fail_after(TIMEOUT):
        async with Scheduler("tcp://127.0.0.1:0") as s:
            with pytest.raises(OSError, match="in use"):
                async with Scheduler(s.address):
                    pass  # pragma: no cover


async def test_abandoned_wait_for_workers_does_not_linger(address: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with Scheduler(address) as s:
            async with Client(s.address, asynchronous=True) as c:
                with pytest.raises(TimeoutError):
                    await c.wait_for_workers(3, timeout=0.05)
            # the scheduler stopped waiting on behalf of the departed requester
            await wait_until(lambda: s._workers_changed.statistics().tasks_waiting == 0)


async def test_client_in_the_same_run_reaches_a_tcp_scheduler_in_memory() -> None:
    """A client in the scheduler's own trio run (a sync Client beside its LocalCluster)
    uses the scheduler's inproc alias; its address stays the tcp one, and it works."""
    with trio.fail_after(TIMEOUT):
        async with Scheduler("tcp://127.0.0.1:0") as s:
            assert s.inproc_address is not None and s.inproc_address.startswith("inproc://")
            async with (
                Worker(s.address, nthreads=1),
                Client(s.address, asynchronous=True) as c,
            ):
                assert c.scheduler_address == s.address
                assert c._link.route == s.inproc_address
                f = c.submit(inc, 1)  # held: a released key may leave who_has at once
                assert await f == 2
                assert await c.who_has() != {}
        assert local_route(s.address) == s.address  # closed: no alias left


def test_client_in_another_run_keeps_tcp() -> None:
    """The alias only means something inside the run that serves it."""
    seen: list[str] = []

    async def serve_and_ask_from_another_run() -> None:
        async with Scheduler("tcp://127.0.0.1:0") as s:
            seen.append(s.address)
            seen.append(await trio.to_thread.run_sync(lambda: trio.run(route_there, s.address)))

    async def route_there(address: str) -> str:
        return local_route(address)

    trio.run(serve_and_ask_from_another_run)
    assert seen[0] == seen[1]


async def test_small_value_goes_with_its_task_finished_to_the_client(address: str) -> None:
    """A worker's ``{"op": "value"}`` just before its TaskFinished (same batch) reaches
    the client with ``KeyInMemory``: ``result()`` needs no fetch from the worker (this
    fake one has no data server). A value whose TaskFinished is not in its batch is
    dropped, and the client then fetches as usual."""
    with trio.fail_after(TIMEOUT):
        async with Scheduler(address) as s:
            worker = await wire.connect(s.address, role="worker")
            await worker.send(add_worker("fake://w3", 2))
            await wait_until(lambda: "fake://w3" in s.state.workers)
            async with (
                wire.open_batched(worker) as out,
                Client(s.address, asynchronous=True) as c,
            ):
                f, g = c.submit(inc, 1), c.submit(inc, 2)
                keys = set()
                while len(keys) < 2:
                    msg = await worker.receive()
                    if type(msg) is m.ComputeTask:
                        keys.add(msg.key)
                out.send_nowait({"op": "value", "key": f.key, "value": 41})
                out.send_nowait(m.TaskFinished("done", 0.0, "fake://w3", f.key, 28, "int"))
                out.send_nowait({"op": "value", "key": g.key, "value": 42})
                await out.flush()
                assert await f.result() == 41  # (so that batch was handled already)
                await out.send(m.TaskFinished("done", 0.0, "fake://w3", g.key, 28, "int"))
                await wait_until(lambda: g.status == "finished")
                assert g._state.held is None
                assert s.state.workers  # the value messages did not break the stream
            await worker.aclose()
