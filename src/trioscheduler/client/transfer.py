"""Data and functions between the client and the workers: gather, scatter, run.

The scheduler only says *where* things are (``who_has``, ``nthreads``); the bytes go
straight between the client and the workers' data servers over pooled connections, as
the runtime contract describes (``get_data``, ``update_data``, ``run``).

* ``gather`` waits for the futures, then fetches each key from one of its holders. A
  holder that vanished or no longer has the key is skipped and the scheduler asked
  again; a key the scheduler reports lost goes back to waiting (it is recomputed).
* ``scatter`` puts data on workers (round robin over thread slots, or everywhere with
  ``broadcast``), then registers it with the scheduler by an RPC, so the next request
  already sees it.

These functions belong to ``Client`` (they use its pool, its key table and its lock);
they live here to keep ``client.py`` about the session and the futures.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Final, SupportsIndex

import trio
from dask.sizeof import sizeof

from trioscheduler import wire
from trioscheduler.client.actors import hold_actors
from trioscheduler.client.futures import Future, FutureCancelledError, KeyState, futures_of
from trioscheduler.client.keys import check_key, scatter_key
from trioscheduler.core import shm_policy
from trioscheduler.errors import TrioSchedulerError
from trioscheduler.wire import shm
from trioscheduler.wire.inproc import InprocStream
from trioscheduler.wire.remote_error import unpack_exception

if TYPE_CHECKING:
    from trioscheduler.client.base import ClientBase
    from trioscheduler.client.client import Client

logger = logging.getLogger("trioscheduler.client")


SCATTER_ATTEMPTS: Final = 3
"""Times ``scatter`` sends again values whose workers all left before it was reported."""

FETCH_BATCH = 10_000
"""Keys per ``who_has`` request and per fetch round of ``gather``: a gather of a million
results moves them a batch at a time, from the first batch done, not all at the end."""


async def gather(client: ClientBase, futures: Any, errors: str) -> Any:
    """``futures`` (nested in lists/tuples/sets/dicts) with their values in place.

    Results are fetched ``FETCH_BATCH`` at a time, in order, each batch as soon as its
    keys are done: the first values arrive while later tasks still run, and no request
    or reply carries more than one batch.
    """
    fs = futures_of(futures)
    states: dict[Any, KeyState] = {}
    for f in fs:
        states.setdefault(f.key, f._state)
    values: dict[Any, Any] = {}
    bad: set[Any] = set()
    while True:
        todo = [k for k in states if k not in values and k not in bad]
        if not todo:
            break
        ready: list[Any] = []
        for k in todo:
            st = states[k]
            await st.wait()
            if st.status != "finished":
                if errors == "raise":
                    exc = st.exception()
                    assert exc is not None
                    raise exc
                bad.add(k)
                continue
            ready.append(k)
            if len(ready) >= FETCH_BATCH:
                values.update(await fetch(client, ready, errors))
                ready = []
        if ready:
            values.update(await fetch(client, ready, errors))
    return repack_values(futures, values, bad)


async def fetch(client: ClientBase, keys: list[Any], errors: str = "raise") -> dict[Any, Any]:
    """Values of finished ``keys`` from the workers holding them.

    A holder that vanished or lost the key is skipped; keys whose state went back to
    pending (``KeyLost``) are left out, for the caller to wait for again.
    """
    out: dict[Any, Any] = {}
    missing = []
    futures = client.futures
    for k in keys:  # small results came with their completion: nothing to fetch
        st = futures.get(k)
        if st is not None and st.held is not None and st.status == "finished":
            out[k] = st.held[0]
        else:
            missing.append(k)
    for i in range(0, len(missing), FETCH_BATCH):
        await _fetch_missing(client, missing[i : i + FETCH_BATCH], out)
    hold_actors(client, out)  # an Actor handed to the user keeps its instance alive
    return out


async def _fetch_missing(client: ClientBase, missing: list[Any], out: dict[Any, Any]) -> None:
    """Values of ``missing`` into ``out``, from their holders (asking again if needed)."""
    attempt = 0
    while missing:
        who_has = {k: v for k, v in await client.rpc({"op": "who_has", "keys": missing})}
        by_worker: dict[str, list[Any]] = defaultdict(list)
        failed: list[Any] = []
        for k in missing:
            holders = who_has.get(k)
            if holders:
                by_worker[random.choice(holders)].append(k)
            else:
                failed.append(k)
        try:
            async with trio.open_nursery() as nursery:
                for worker, ks in by_worker.items():
                    nursery.start_soon(get_data, client, worker, ks, out, failed)
        except BaseExceptionGroup as group:  # a value that cannot travel: its own error
            first: BaseException = group
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        missing = []
        for k in failed:
            st = client.futures.get(k)
            if st is not None and st.status == "finished":
                missing.append(k)
        if missing:
            attempt += 1
            if attempt > 50:
                raise TrioSchedulerError(
                    f"could not fetch {missing[:5]!r} from any worker after {attempt} attempts "
                    "(the scheduler lists holders that do not have the data)"
                )
            await trio.sleep(min(0.005 * 2**attempt, 0.5))


async def get_data(
    client: ClientBase, worker: str, keys: list[Any], out: dict[Any, Any], failed: list[Any]
) -> None:
    try:
        async with client.worker_connection(worker) as stream:
            await stream.send({"op": "get_data", "keys": keys})
            reply = await stream.receive()
    except wire.ProtocolError as exc:
        if isinstance(exc.__cause__, wire.DeserializationError):  # no retry would help
            raise wire.DeserializationError(
                f"the value of {keys[0] if len(keys) == 1 else keys!r} arrived from {worker} "
                f"but cannot be loaded here: {exc.__cause__}"
            ) from exc.__cause__
        logger.info(
            "client %s: fetching %d keys from %s failed: %r", client.id, len(keys), worker, exc
        )
        failed.extend(keys)
        return
    except (
        OSError,
        trio.BrokenResourceError,
        trio.ClosedResourceError,
        trio.EndOfChannel,
    ) as exc:
        logger.info(
            "client %s: fetching %d keys from %s failed: %r", client.id, len(keys), worker, exc
        )
        failed.extend(keys)
        return
    if reply.get("status") != "OK":
        logger.info("client %s: %s could not serve data: %s", client.id, worker, reply.get("text"))
        failed.extend(keys)
        return
    errors = reply.get("errors")
    if errors:  # the worker holds it, but it cannot be serialized: the real error, at once
        key, (blob, tb, text) = next(iter(errors.items()))
        error = unpack_exception(blob, tb, text)
        error.add_note(f"(the result of {key!r} is on {worker} but cannot be serialized)")
        raise error
    out.update(reply["data"])
    failed.extend(reply.get("missing") or ())


async def scatter(
    client: Client,
    data: Any,
    workers: list[str] | None,
    broadcast: bool,
    hash: bool,
    timeout: float | None,  # noqa: ASYNC109 - the user's timeout, passed through
    attempt: int = 0,
) -> Any:
    """Futures shaped like ``data`` (one value, a list/tuple, or a dict of key -> value).

    Values the scheduler did not take (every worker that got one is gone, or restarted
    at its address, by the time the scatter is reported) are sent again, a few times.

    To a worker on this host, large buffers (numpy arrays: pickle protocol 5, out of
    band) go through shared memory: copied once into new segments that the worker maps
    and keeps (``wire.shm.hand_off``), not through the socket. That copy runs in a
    thread beside the hashing of the keys (both release the GIL), which is dask's
    ``tokenize`` as before: the keys are dask's.
    """
    kind = type(data)
    if kind in (set, frozenset):
        data = list(data)
    single = type(data) not in (dict, list, tuple)
    if single:
        data = [data]
    given: list[Any] | None = None
    if isinstance(data, dict):
        for k in data:
            check_key(k)
        given = list(data)
        values = list(data.values())
    else:
        values = list(data)
    large = [_large(v) for v in values]
    names: list[Any] = []
    if given is not None:
        names = given
    elif not any(large) or not all(
        _hashed_without_gil(v) for b, v in zip(large, values, strict=True) if b
    ):
        # hashed here, before any connection is opened: a hash that holds the GIL for
        # long (an object's pickle, a long repr) would stall a handshake in progress
        names = _tokens(values, hash)
    with trio.fail_after(client.timeout if timeout is None else timeout):
        nthreads: dict[str, int] = await client.rpc({"op": "nthreads", "workers": workers})
        while not nthreads:
            await client.rpc({"op": "wait_for_workers", "n_workers": 1})
            nthreads = await client.rpc({"op": "nthreads", "workers": workers})
    targets = sorted(nthreads)
    plan: dict[str, list[int]] = defaultdict(list)  # worker -> indexes into values
    if broadcast:
        for t in targets:
            plan[t] = list(range(len(values)))
    else:
        slots = [t for t in targets for _ in range(max(1, nthreads[t]))]
        start = random.randrange(len(slots))
        for i in range(len(values)):
            plan[slots[(start + i) % len(slots)]].append(i)
    who_has: dict[Any, list[str]] = defaultdict(list)
    nbytes: dict[Any, int] = {}
    seqs: dict[str, int] = {}
    runs: dict[str, str] = {}  # each holder's run, as its reply named it
    named = trio.Event()
    encoded = [_LargeBytes(v) if _large_bytes(v) else v for v in values]

    futures: dict[Any, Future] = {}

    async def name_all() -> None:
        if not names:  # large arrays or bytes: hashed in a thread, beside their copies
            tokens = await trio.to_thread.run_sync(_tokens, values, hash)
            names.extend(tokens)
        # Counted before any value leaves: a Future of the same key (the same value
        # scattered before) dropped meanwhile then releases nothing. Counted only after
        # the scheduler's update_data, its release could follow that registration on the
        # stream and take the key, and the new copies, off the cluster.
        states = client.futures.hold_scattered(dict.fromkeys(names))
        futures.update((k, Future(k, client, st)) for k, st in states.items())
        named.set()

    async def send(worker: str, idx: list[int]) -> None:
        async with client.worker_connection(worker) as stream:
            # a worker in this trio run gets the values themselves, by reference
            sent = values if isinstance(stream, InprocStream) else encoded
            handoffs: dict[int, shm.HandOff] = {}
            try:
                if (
                    any(large[i] for i in idx)
                    and worker not in client.no_shm_workers
                    and _same_host(stream.peer_info)
                ):
                    handoffs = await trio.to_thread.run_sync(_hand_off, sent, idx)
                await named.wait()
                request: dict[str, Any] = {
                    "op": "update_data",
                    "data": {names[i]: sent[i] for i in idx if i not in handoffs},
                }
                if handoffs:
                    request["shared"] = {names[i]: h.message for i, h in handoffs.items()}
                await stream.send(request)
                reply = await stream.receive()
            finally:  # the worker maps them now (or never will): our descriptors go
                for h in handoffs.values():
                    h.close()
        if reply.get("shm") == "failed":  # the worker could not map them: the socket
            logger.info(
                "client %s: shared memory with %s failed (%s); using the socket",
                client.id, worker, reply.get("text"),
            )  # fmt: skip
            client.no_shm_workers.add(worker)
            await send(worker, idx)  # (no hand-off to a worker in no_shm_workers)
            return
        if reply.get("status") != "OK":
            raise TrioSchedulerError(f"scatter to {worker} failed: {reply.get('text')}")
        for k, n in reply["nbytes"].items():
            who_has[k].append(worker)
            nbytes[k] = n
        if isinstance(reply.get("seq"), int):
            seqs[worker] = reply["seq"]
        if isinstance(reply.get("incarnation"), str):
            runs[worker] = reply["incarnation"]

    try:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(name_all)
                for worker, idx in plan.items():
                    nursery.start_soon(send, worker, idx)
        except BaseExceptionGroup as group:
            raise wire.sole_error(group) from None
        lost = await client.rpc(
            {
                "op": "update_data",
                "items": [[k, who_has[k], nbytes[k]] for k in who_has],
                "seqs": seqs,
                "incarnations": runs,
            }
        )
        if lost:
            if attempt >= SCATTER_ATTEMPTS:
                raise TrioSchedulerError(
                    f"scatter: no worker kept {lost[:5]!r} after {attempt + 1} attempts "
                    "(the workers that took them left or restarted)"
                )
            logger.info("client %s: scattering %d values again", client.id, len(lost))
            by_name = dict(zip(names, values, strict=True))
            # counted by ``futures`` already: the ones the call makes go at once
            await scatter(
                client, {k: by_name[k] for k in lost}, workers, broadcast, hash, timeout,
                attempt + 1,
            )  # fmt: skip
    except BaseException:
        for f in futures.values():  # now, not when the traceback goes
            f.release()
        raise
    named_values = dict(zip(names, values, strict=True))
    for k, v in named_values.items():
        if not futures[k]._state.done or futures[k]._state.status != "finished":
            futures[k]._state.finish(type(v).__name__)
    if single:
        return futures[names[0]]
    if given is not None:
        return futures
    out = [futures[k] for k in names]
    return tuple(out) if kind is tuple else out


_IN_BAND: Final = (bytes, str)


class _LargeBytes:
    """A large ``bytes`` on its way to a worker, which unpickles it as ``bytes(buffer)``:
    its contents travel out of band (a frame of their own, or a segment handed over),
    never packed into the message header first (msgpack would copy it there, growing its
    buffer as it goes, before the wire found the message large: 1-3 s for 500 MB)."""

    __slots__ = ("value",)

    def __init__(self, value: bytes) -> None:
        self.value = value

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        if int(protocol) < 5:
            return bytes, (self.value,)
        return bytes, (pickle.PickleBuffer(self.value),)


def _large_bytes(value: Any) -> bool:
    return type(value) is bytes and len(value) >= shm_policy.SHM_MIN_BYTES


def _large(value: Any) -> bool:
    """Could ``value`` carry a buffer worth handing over through shared memory?"""
    return shm_policy.share_buffer(sizeof(value))


def _hashed_without_gil(value: Any) -> bool:
    """Whether ``scatter_key`` hashes ``value`` with the GIL released (``hashlib`` over
    its buffer): a ``bytes``, a numpy array of plain numbers (dask's ``tokenize``)."""
    if type(value) is bytes:
        return True
    dtype = getattr(value, "dtype", None)
    return (
        type(value).__name__ == "ndarray"
        and type(value).__module__ == "numpy"
        and dtype is not None
        and not dtype.hasobject
    )


def _tokens(values: list[Any], hash: bool) -> list[str]:
    return [scatter_key(x, hash) for x in values]


def _same_host(info: dict[str, Any]) -> bool:
    """Whether a worker (its handshake's ``info``) can take our buffers through shared
    memory: same host identity, another process, neither side switched off."""
    return shm_policy.use_shared_memory(
        shm.HOST_ID, info.get("shm"), shm.enabled_by_environment(), os.getpid(), info.get("pid")
    )


def _hand_off(values: list[Any], idx: list[int]) -> dict[int, shm.HandOff]:
    """The values at ``idx`` that have large buffers, copied into new segments (in a
    thread). A failure to make segments (descriptors, memory) sends them by socket."""
    out: dict[int, shm.HandOff] = {}
    try:
        for i in idx:
            if type(values[i]) in _IN_BAND:  # pickled in line: nothing to hand over
                continue
            h = shm.hand_off(values[i])
            if h is not None:
                out[i] = h
    except OSError as exc:
        logger.info("scatter: shared memory failed (%s); sending through the socket", exc)
        for h in out.values():
            h.close()
        return {}
    return out


async def run_on_workers(
    client: ClientBase, payload: bytes, workers: list[str] | None, on_error: str = "raise"
) -> dict[str, Any]:
    """``{worker: result}`` of one ``run`` request per worker (see ``Client.run``)."""
    targets = sorted(await client.rpc({"op": "nthreads", "workers": workers}))
    replies: dict[str, dict[str, Any]] = {}

    async def one(worker: str) -> None:
        try:
            async with client.worker_connection(worker) as stream:
                await stream.send({"op": "run", "function": payload})
                replies[worker] = await stream.receive()
        except (OSError, trio.BrokenResourceError, trio.EndOfChannel) as exc:
            replies[worker] = {"status": "error", "text": f"could not reach {worker}: {exc!r}"}

    async with trio.open_nursery() as nursery:
        for worker in targets:
            nursery.start_soon(one, worker)
    results: dict[str, Any] = {}
    for worker in targets:
        reply = replies[worker]
        if reply.get("status") == "OK":
            results[worker] = reply["result"]
            continue
        if "exception" in reply:
            exc: BaseException = unpack_exception(
                reply["exception"], reply["traceback"], reply["text"]
            )
        else:
            exc = TrioSchedulerError(f"run on {worker} failed: {reply.get('text')}")
        if on_error == "raise":
            raise exc
        if on_error == "return":
            results[worker] = exc
    return results


def repack_values(obj: Any, values: dict[Any, Any], bad: set[Any]) -> Any:
    """``obj`` with every future replaced by its value; futures in ``bad`` dropped."""
    t = type(obj)
    if t is Future:
        if obj.key in bad:
            raise FutureCancelledError(obj.key, obj._state.reason or obj._state.status)
        return values[obj.key]
    if t in (list, tuple, set, frozenset):
        items = [
            repack_values(x, values, bad) for x in obj if not (type(x) is Future and x.key in bad)
        ]
        return t(items)
    if t is dict:
        return {
            k: repack_values(v, values, bad)
            for k, v in obj.items()
            if not (type(v) is Future and v.key in bad)
        }
    return obj
