"""Managing workers and where data lives, from a client: ``retire_workers`` (data moved
away first), ``restart_workers`` (through their nannies), ``replicate``, ``rebalance`` and
the Active Memory Manager (``client.amm``).

The scheduler decides (its core's retirement, ``core.replication``'s plans); these
methods check their arguments, ask, and shape the answers as dask's.
"""

from __future__ import annotations

from typing import Any

from trioscheduler.client.base import ClientBase
from trioscheduler.client.futures import futures_of

__all__ = ["AMMClientProxy", "WorkerMethods"]


def _workers_arg(workers: Any, what: str) -> list[Any] | None:
    if workers is None:
        return None
    if isinstance(workers, (str, int)):
        return [workers]
    if not isinstance(workers, (list, tuple, set, frozenset)):
        raise TypeError(f"{what}: workers= takes addresses or names (a list), got {workers!r}")
    return list(workers)


class AMMClientProxy:
    """``client.amm``: start, stop, or run once the scheduler's Active Memory Manager
    (dask's default policy, ReduceReplicas: extra copies of a key are dropped)."""

    def __init__(self, client: ClientBase) -> None:
        self._client = client

    def _op(self, action: str) -> Any:
        return self._client.sync(self._client.rpc, {"op": "amm", "action": action})

    def start(self) -> Any:
        """Run the policy every ``interval`` (2 s) from now on."""
        return self._op("start")

    def stop(self) -> Any:
        """Stop running the policy periodically."""
        return self._op("stop")

    def running(self) -> Any:
        """Whether the policy runs periodically."""
        return self._op("running")

    def run_once(self) -> Any:
        """Run the policy now, once."""
        return self._op("run_once")


class WorkerMethods(ClientBase):
    """``Client`` methods that manage workers and replicas (mixed into ``Client``)."""

    def retire_workers(self, workers: Any = None, close_workers: bool = True, **kwargs: Any) -> Any:
        """Move the data only these workers hold to other workers, then close them.

        ``{address: worker info}`` of the retired workers. ``workers`` are addresses or
        names; unknown ones raise ``ValueError``. Without ``workers``, the idle workers
        (nothing held, nothing running) are retired, keeping at least one.
        """
        if not close_workers:
            raise ValueError(
                "retire_workers(close_workers=False): a retired worker is always closed in "
                "trioscheduler (its nanny stops with it)"
            )
        timeout = kwargs.pop("timeout", 60)
        if kwargs:
            raise TypeError(f"retire_workers() got unexpected keyword arguments {sorted(kwargs)}")
        request = {
            "op": "retire_workers",
            "workers": _workers_arg(workers, "retire_workers"),
            "timeout": timeout,
        }
        return self.sync(self.rpc, request)

    def restart_workers(
        self, workers: Any, timeout: float | None = None, raise_for_error: bool = True
    ) -> Any:
        """Restart these workers (addresses or names) through their nannies; the tasks
        they ran go elsewhere or wait. ``{worker: "OK" | "timed out" | error}``, keyed as
        given; with ``raise_for_error`` a worker not back in time raises ``TimeoutError``."""
        names = _workers_arg(workers, "restart_workers")
        if not names:
            raise ValueError("restart_workers needs the workers to restart (a list)")
        return self.sync(
            self._restart_workers, names, 60.0 if timeout is None else timeout, raise_for_error
        )

    async def _restart_workers(
        self,
        names: list[Any],
        timeout: float,  # noqa: ASYNC109
        raise_for_error: bool,
    ) -> Any:
        info = await self.rpc({"op": "scheduler_info"})
        by_name = {str(w["name"]): a for a, w in info["workers"].items() if w["name"] is not None}
        addrs = {n: n if n in info["workers"] else by_name.get(str(n), n) for n in names}
        got = await self.rpc(
            {"op": "restart_workers", "workers": list(addrs.values()), "timeout": timeout}
        )
        out = {}
        for n, a in addrs.items():
            status = got.get(a, "removed")
            out[n] = "timed out" if "within" in status else status
        if raise_for_error:
            bad = {n: s for n, s in out.items() if s != "OK"}
            if any(s == "timed out" for s in bad.values()):
                raise TimeoutError(f"restart_workers: not back within {timeout} s: {bad}")
            if bad:
                raise RuntimeError(f"restart_workers failed: {bad}")
        return out

    def replicate(
        self,
        futures: Any,
        n: int | None = None,
        workers: Any = None,
        branching_factor: int = 2,
        **kwargs: Any,
    ) -> Any:
        """Copy the data of ``futures`` to ``n`` workers (all, or all of ``workers``).

        Waits for the futures first. ``branching_factor`` is accepted for dask's
        signature: each new copy is fetched from the current holders.
        """
        if n is not None and (not isinstance(n, int) or isinstance(n, bool)):
            raise TypeError(f"replicate: n must be an integer, got {n!r}")
        if n is not None and n <= 0:
            raise ValueError(
                "Can not use replicate to delete data"
                if n == 0
                else f"replicate: n must be positive, got {n}"
            )
        timeout = kwargs.pop("timeout", 60)
        if kwargs:
            raise TypeError(f"replicate() got unexpected keyword arguments {sorted(kwargs)}")
        fs = futures_of(futures)
        if not fs:
            return None
        return self.sync(self._replicate, fs, n, _workers_arg(workers, "replicate"), timeout)

    async def _replicate(self, fs: list[Any], n: int | None, workers: Any, timeout: float) -> None:  # noqa: ASYNC109
        await _await_all(fs)
        keys = list(dict.fromkeys(f.key for f in fs))
        await self.rpc(
            {"op": "replicate", "keys": keys, "n": n, "workers": workers, "timeout": timeout}
        )

    def rebalance(self, futures: Any = None, workers: Any = None, **kwargs: Any) -> Any:
        """Even out the bytes held by the workers (or ``workers``), moving keys (of
        ``futures``, or any) from the fullest to the emptiest."""
        if kwargs:
            raise TypeError(f"rebalance() got unexpected keyword arguments {sorted(kwargs)}")
        fs = futures_of(futures) if futures is not None else None
        return self.sync(self._rebalance, fs, _workers_arg(workers, "rebalance"))

    async def _rebalance(self, fs: list[Any] | None, workers: Any) -> None:
        keys = None
        if fs is not None:
            await _await_all(fs)
            keys = list(dict.fromkeys(f.key for f in fs))
        await self.rpc({"op": "rebalance", "keys": keys, "workers": workers})

    @property
    def amm(self) -> AMMClientProxy:
        """The scheduler's Active Memory Manager: ``client.amm.start()``, ``.stop()``,
        ``.running()``, ``.run_once()``."""
        return AMMClientProxy(self)


async def _await_all(fs: list[Any]) -> None:
    from trioscheduler.client.futures import _wait

    await _wait(fs, None, "ALL_COMPLETED")
    bad = [f for f in fs if f.status != "finished"]
    if bad:
        raise ValueError(f"{len(bad)} futures are not finished (e.g. {bad[0]!r}): nothing to copy")
