"""A worker's dealings with its peers: fetching dependencies from them and answering them.

``gather_dep`` carries out the core's ``GatherDep`` (one ``get_data`` round trip per
peer, shared memory from a peer on this host) and reports ``GatherDepSuccess`` or
``GatherDepFailure``; ``serve_peer`` is the data server every connection to the worker's
listener runs: ``get_data``, ``update_data``, ``run``, ``start_ipython``, actor calls,
``get_logs`` (``docs/runtime-contract.md``). A value that cannot travel (it cannot be
serialized here or loaded there) is reported to the scheduler once, so its key errs
instead of being fetched again and again.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import trio

from trioscheduler import wire
from trioscheduler.core import shm_policy
from trioscheduler.core.messages import (
    GatherDepFailure,
    GatherDepSuccess,
    TaskErred,
    WorkerUpdateData,
)
from trioscheduler.http import logs
from trioscheduler.server import same_host, task_context
from trioscheduler.server.calling import call_pickled
from trioscheduler.server.executor import nbytes_and_type
from trioscheduler.server.stimuli import now as _now
from trioscheduler.server.stimuli import stimulus as _stimulus
from trioscheduler.wire import serialize, shm
from trioscheduler.wire.remote_error import pack_exception

if TYPE_CHECKING:
    from trioscheduler.server.worker import Worker

__all__ = ["gather_dep", "get_data", "report_unusable", "serve_peer"]

logger = logging.getLogger("trioscheduler.worker")


async def gather_dep(w: Worker, peer: str, keys: list[Any]) -> None:
    assert w.store is not None and w._pool is not None
    started = time.time()
    unusable: list[Any] = []
    try:
        try:
            reply = await _fetch(w, peer, keys)
        except wire.ProtocolError as exc:
            if not isinstance(exc.__cause__, wire.DeserializationError):
                raise
            # It arrived whole and cannot be loaded here: no retry will help. Which
            # key? Each on its own, so that the others still arrive.
            reply = {"status": "OK", "data": {}, "missing": []}
            seqs: list[Any] = []
            for key in keys if len(keys) > 1 else ():
                try:
                    one = await _fetch(w, peer, [key])
                except wire.ProtocolError as e:
                    if not isinstance(e.__cause__, wire.DeserializationError):
                        raise
                    report_unusable(w, key, e.__cause__, _cannot_load(w))
                    unusable.append(key)
                else:
                    reply["data"].update(one["data"])
                    reply["missing"] += one.get("missing", [])
                    unusable += list(one.get("errors") or ())
                    seqs.append(one.get("seq"))
            if seqs and all(type(s) is int for s in seqs):
                reply["seq"] = min(seqs)  # the earliest look answers for them all
            if len(keys) == 1:
                report_unusable(w, keys[0], exc.__cause__, _cannot_load(w))
                unusable.append(keys[0])
    except trio.Cancelled:
        raise
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        logger.info(
            "worker %s: fetching %d keys from %s failed: %s",
            w.address,
            len(keys),
            peer,
            reason,
        )
        w.handle(
            GatherDepFailure(
                stimulus_id=_stimulus("gather-dep-failure"),
                now=_now(),
                peer=peer,
                keys=list(keys),
                reason=reason,
            )
        )
        return
    unusable += list(reply.get("errors") or ())  # the holder could not serialize them
    sizes: dict[Any, int] = {}
    for key, value in reply["data"].items():
        w.store.put(key, value)
        sizes[key] = _sizeof(value)
    if sizes and len(w._transfers) < 1000:  # reported with the next heartbeat
        first = next(iter(sizes))
        w._transfers.append(
            [started, time.time(), peer, sum(sizes.values()), [first], len(sizes)]
        )
    w.handle(
        GatherDepSuccess(
            stimulus_id=_stimulus("gather-dep-success"),
            now=_now(),
            peer=peer,
            data=sizes,
            missing=list(reply.get("missing", [])),
            unusable=unusable,
            peer_seq=seq if type(seq := reply.get("seq")) is int else None,
        )
    )


def _cannot_load(w: Worker) -> str:
    return f"cannot be deserialized on {w.address}"


async def _fetch(w: Worker, peer: str, keys: list[Any]) -> dict[str, Any]:
    """One ``get_data`` round trip; raises on a failed transfer or an error reply.

    From a peer on this host, large buffers come through shared memory; if mapping
    its segments fails here (e.g. ``/proc/<pid>/fd`` is not ours to open), that
    peer's data comes through the socket from then on, starting with this fetch.
    """
    use_shm = w.shared_memory and peer not in w._no_shm_peers
    try:
        return await _get_data_from(w, peer, keys, use_shm)
    except (trio.BrokenResourceError, RuntimeError) as exc:
        if not use_shm or not same_host.from_shared_memory(exc):
            raise
        logger.warning(
            "worker %s: shared memory with %s failed (%s); using the socket",
            w.address, peer, exc,
        )  # fmt: skip
        w._no_shm_peers.add(peer)
        return await _get_data_from(w, peer, keys, False)


async def _get_data_from(w: Worker, peer: str, keys: list[Any], use_shm: bool) -> dict[str, Any]:
    assert w._pool is not None
    async with w._pool.connect(peer) as stream:
        request: dict[str, Any] = {"op": "get_data", "keys": list(keys)}
        if use_shm:
            request["shm"] = shm.HOST_ID
            request["pid"] = os.getpid()
        await stream.send(request)
        reply = await stream.receive()
    if not isinstance(reply, dict) or reply.get("status") != "OK":
        text = reply.get("text") if isinstance(reply, dict) else repr(reply)
        raise RuntimeError(f"peer answered: {text}")
    if use_shm and reply.get("shm") == shm.HOST_ID:  # a peer on this host
        w.placer.peer_seen(reply.get("pid"))
    return reply


async def serve_peer(w: Worker, stream: Any) -> None:
    """Answer request dicts on one connection until the peer closes it."""
    try:
        async for request in stream:
            try:
                reply = await _answer(w, request)
            except trio.Cancelled:
                raise
            except Exception as exc:
                logger.info(
                    "worker %s: request from %s failed: %r",
                    w.address,
                    getattr(stream, "peer_address", "?"),
                    exc,
                )
                reply = {"status": "error", "text": f"{type(exc).__name__}: {exc}"}
            try:
                await stream.send(reply)
            except wire.SerializationError:
                if not (isinstance(request, dict) and request.get("op") == "get_data"):
                    raise
                await stream.send(_without_unserializable(w, reply))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


def _without_unserializable(w: Worker, reply: dict[str, Any]) -> dict[str, Any]:
    """A ``get_data`` reply that failed to serialize, without the values that cannot
    travel: those go back as ``errors`` (the real exception, per key), and the
    scheduler learns each key's value is unusable elsewhere, once, so the key and
    its dependents err instead of being fetched again and again."""
    data = dict(reply["data"])
    errors: dict[Any, Any] = {}
    for key, value in list(data.items()):
        try:
            serialize.dumps(value)
        except Exception as exc:
            del data[key]
            errors[key] = pack_exception(exc)[:3]
            report_unusable(w, key, exc, f"cannot be serialized to leave {w.address}")
    return {**reply, "data": data, "errors": errors}


def report_unusable(w: Worker, key: Any, exc: BaseException, why: str) -> None:
    """Tell the scheduler (once per key) that the value of ``key`` cannot travel:
    it errs with ``exc``, its dependents with it."""
    if key in w._unusable_reported:
        return
    w._unusable_reported.add(key)
    logger.warning("worker %s: the value of %r %s: %r", w.address, key, why, exc)
    blob, tb, text, tb_text = pack_exception(exc)
    w._send(
        TaskErred(
            stimulus_id=_stimulus("value-unusable"),
            now=_now(),
            worker=w.address,
            key=key,
            exception=blob,
            traceback=tb,
            exception_text=f"the result of {key!r} {why}: {text}",
            traceback_text=tb_text,
        )
    )


async def _answer(w: Worker, request: Any) -> dict[str, Any]:
    if not isinstance(request, dict):
        return {
            "status": "error",
            "text": f"expected a request dict, got {type(request).__name__}",
        }
    op = request.get("op")
    if op == "get_data":
        return await get_data(w, request["keys"], request.get("shm"), request.get("pid"))
    if op == "update_data":
        data = request["data"]
        if request.get("shared"):  # from a client on this host, through shared memory
            if not w.shared_memory:
                return {"status": "error", "shm": "failed", "text": "shared memory is off"}
            try:
                data = {**data, **same_host.adopt_all(request["shared"])}
            except shm.SharedMemoryError as exc:
                return {"status": "error", "shm": "failed", "text": str(exc)}
        return _update_data(w, data)
    if op == "run":
        return await _run_function(w, request["function"])
    if op == "start_ipython":  # a kernel in this process with ``worker`` in it
        from trioscheduler.kernels.service import start_ipython_reply

        assert w._nursery is not None
        result = await start_ipython_reply(
            w,
            role="worker",
            address=w.address,
            directory=w.local_directory,
            nursery=w._nursery,
        )
        return {"status": "OK", "result": result}
    if op == "actor_execute" or op == "actor_attribute":
        return await w.actors.answer(request)
    if op == "get_logs":
        return {"status": "OK", "logs": logs.install().lines()}
    return {
        "status": "error",
        "text": f"unknown op {op!r}; this worker knows get_data, update_data, run, "
        "start_ipython, actor_execute, actor_attribute, get_logs",
    }


async def get_data(
    w: Worker, keys: list[Any], peer_host: Any = None, peer_pid: Any = None
) -> dict[str, Any]:
    store = w.store
    assert store is not None
    # Our data-update count before looking: a key scattered here after it was found
    # missing is newer than this answer, and the scheduler keeps counting that copy
    # when the fetcher reports the key missing here (``MissingData.errant_seq``).
    seq = None if w.state is None else w.state.scatter_seq
    data: dict[Any, Any] = {}
    missing: list[Any] = []
    share = shm_policy.use_shared_memory(
        shm.HOST_ID, peer_host, w.shared_memory, os.getpid(), peer_pid
    )
    if share:  # a peer on this host: our large results go into shared memory from now
        w.placer.peer_seen(peer_pid)
    for key in keys:
        value = store.get_in_memory(key)
        if not store.is_missing(value):
            if share:
                value = await _share(w, key, value, in_memory=True)
            data[key] = value
        elif key in store.spilled:
            try:  # disk reads off the loop; the value may be deleted meanwhile
                value = await trio.to_thread.run_sync(store.__getitem__, key)
            except KeyError:
                missing.append(key)
                continue
            if share:
                value = await _share(w, key, value, in_memory=False)
            data[key] = value
        else:
            missing.append(key)
    if share:
        return {
            "status": "OK", "data": data, "missing": missing, "seq": seq, "shm": shm.HOST_ID,
            "pid": os.getpid(),
        }  # fmt: skip
    return {"status": "OK", "data": data, "missing": missing, "seq": seq}


async def _share(w: Worker, key: Any, value: Any, *, in_memory: bool) -> Any:
    assert w.store is not None
    return await same_host.share(
        w.store, key, value, w.shared_memory_threshold, in_memory, w.address
    )


def _update_data(w: Worker, data: dict[Any, Any]) -> dict[str, Any]:
    assert w.store is not None
    nbytes: dict[Any, int] = {}
    for key, value in data.items():
        w.store.put(key, value)
        nbytes[key] = _sizeof(value)
    w.handle(WorkerUpdateData(stimulus_id=_stimulus("update-data"), now=_now(), data=nbytes))
    # the update's number, for the scheduler to name in a later FreeKeys (see FreeKeys)
    seq = None if w.state is None else w.state.scatter_seq
    return {"status": "OK", "nbytes": nbytes, "seq": seq, "incarnation": w.incarnation}


async def _run_function(w: Worker, payload: bytes) -> dict[str, Any]:
    try:
        token = task_context.current_worker.set(w)
        try:
            result = await call_pickled(payload, "dask_worker", w)
        finally:
            task_context.current_worker.reset(token)
    except trio.Cancelled:
        raise
    except Exception as exc:
        blob, tb_blob, text, _ = pack_exception(exc)
        return {"status": "error", "exception": blob, "traceback": tb_blob, "text": text}
    return {"status": "OK", "result": result}


def _sizeof(value: Any) -> int:
    return nbytes_and_type(value)[0]
