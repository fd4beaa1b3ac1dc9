"""TLS workloads: what encryption costs us, and how that compares with dask's TLS.

Both sides use the same throwaway certificate (``Security.temporary()``: an EC P-256
key and a self-signed CA), mutual TLS, on loopback; dask's side gets it through its own
``distributed.Security`` with the same PEM text.

* ``tls-rtt-p50``: round trip of a tiny message over TLS, median in microseconds, ours
  ``Stream.send``/``receive`` against ``distributed.comm`` ``write``/``read`` (echo peer).
* ``tls-large``: 200 MB numpy arrays over one TLS connection (MB/s), sender and
  receiver in two threads of one process, ours against ``distributed.comm`` TLS with the
  array as ``to_serialize`` (what its workers send).
* ``tls-cost-rtt-p50`` / ``tls-cost-large``: ours over TLS against ours over plain TCP
  (loopback TCP itself, the same-host shortcut off), same sizes: the ratio is what TLS costs us (below 1 = TLS is slower).
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import lru_cache
from typing import Any

from benchmarks import wire
from benchmarks._harness import register
from benchmarks.wire import _in_threads, _large_array, _percentile
from trioscheduler.wire.security import Security, connect_args, listen_args


@lru_cache(maxsize=1)
def _security() -> Security:
    return Security.temporary()


def _dask_security() -> Any:
    from distributed import Security as DaskSecurity

    ours = _security()
    return DaskSecurity(
        require_encryption=True,
        tls_ca_file=ours.tls_ca_file,
        tls_client_cert=ours.tls_client_cert,
        tls_client_key=ours.tls_client_key,
        tls_scheduler_cert=ours.tls_scheduler_cert,
        tls_scheduler_key=ours.tls_scheduler_key,
    )


def _ours_args(scheme: str) -> dict[str, Any]:
    if scheme == "tcp":
        return {"scheme": "tcp"}
    return {
        "scheme": scheme,
        "server_args": listen_args(_security(), "scheduler"),
        "client_args": connect_args(_security(), "client"),
    }


# The loops are wire.py's (TCP), run over TLS here.


def ours_rtt(quick: bool, scheme: str = "tls") -> list[float]:
    return wire.ours_rtt(quick, **_ours_args(scheme))


def distributed_rtt(quick: bool) -> list[float]:
    return wire.distributed_rtt(quick, security=_dask_security())


def ours_large(quick: bool, scheme: str = "tls") -> float:
    return wire.ours_large(quick, **_ours_args(scheme))


def distributed_large(quick: bool) -> float:
    from distributed.comm import connect as d_connect
    from distributed.comm import listen as d_listen
    from distributed.protocol import to_serialize

    logging.getLogger("distributed").setLevel(logging.ERROR)
    arr, count = _large_array(quick)
    sec = _dask_security()

    def receiver(q: Any) -> float:
        async def main() -> float:
            finished = asyncio.Event()
            done: list[float] = []

            async def handler(comm: Any) -> None:
                for _ in range(count):
                    got = await comm.read()
                    assert got["x"].nbytes == arr.nbytes
                    del got
                done.append(time.perf_counter())
                finished.set()

            listener = await d_listen(
                "tls://127.0.0.1:0", handler, **sec.get_listen_args("scheduler")
            )
            await listener.start()
            q.put(listener.contact_address)
            await finished.wait()
            listener.stop()
            return done[0]

        return asyncio.run(main())

    def sender(address: str) -> float:
        async def main() -> float:
            comm = await d_connect(address, **sec.get_connection_args("client"))
            start = time.perf_counter()
            for _ in range(count):
                await comm.write({"x": to_serialize(arr)})
            await comm.close()
            return start

        return asyncio.run(main())

    start, end = _in_threads(receiver, sender)
    return arr.nbytes * count / (end - start) / 1e6


register(
    "tls-rtt-p50",
    description=(
        "Round trip of a tiny message over mutual TLS on loopback, median in "
        "microseconds: ours against distributed.comm TLS write/read (echo peer)."
    ),
    unit="us",
    ours=lambda quick: _percentile(ours_rtt(quick), 50),
    reference=lambda quick: _percentile(distributed_rtt(quick), 50),
    reference_label="distributed.comm TLS write/read",
    higher_is_better=False,
)
register(
    "tls-large",
    description="200 MB numpy arrays over one mutual-TLS connection on loopback (MB/s).",
    unit="MB/s",
    ours=ours_large,
    reference=distributed_large,
    reference_label="distributed.comm TLS",
)
register(
    "tls-cost-rtt-p50",
    description="Our round trip over TLS against ours over plain TCP (us; ratio = TLS cost).",
    unit="us",
    ours=lambda quick: _percentile(ours_rtt(quick), 50),
    reference=lambda quick: _percentile(wire.over_tcp(ours_rtt)(quick, "tcp"), 50),
    reference_label="ours, plain tcp",
    higher_is_better=False,
)
register(
    "tls-cost-large",
    description="Our 200 MB arrays over TLS against ours over plain TCP (MB/s; ratio = TLS cost).",
    unit="MB/s",
    ours=ours_large,
    reference=lambda quick: wire.over_tcp(ours_large)(quick, "tcp"),
    reference_label="ours, plain tcp",
)
