"""``Adaptive``: a cluster that grows with its backlog and shrinks when idle.

The decision is ``core.adaptive`` (pure, hypothesis-tested); this shell only looks at
the scheduler every ``interval`` and carries decisions out through the cluster's
``scale_to(n)`` and ``retire(workers)`` (what ``scale_up``/``scale_down`` call). Closing is graceful: a worker to close is
retired first (its unique data copied to another worker), as dask's ``retire_workers``.
A step that fails (a worker that would not start) is logged and the next step tries
again; the loop never ends on its own.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import trio
from dask.utils import parse_timedelta

from trioscheduler.core.adaptive import AdaptivePolicy, Decision, backlog_of

__all__ = ["Adaptive"]

logger = logging.getLogger("trioscheduler.adaptive")


class Adaptive:
    """Adapt ``cluster`` (a ``LocalCluster``) between ``minimum`` and ``maximum`` workers.

    ``interval``: time between looks; ``wait_count``: how many consecutive looks a worker
    must be surplus before it is closed; ``target_duration``: the backlog should take
    about this long. Times as dask takes them (``"1s"``, ``"500ms"``, seconds).
    ``minimum_cores``/``maximum_cores`` bound the workers by their threads instead.
    """

    def __init__(
        self,
        cluster: Any,
        minimum: int = 0,
        maximum: float = math.inf,
        interval: str | float = "1s",
        wait_count: int = 3,
        target_duration: str | float = "5s",
        minimum_cores: int | None = None,
        maximum_cores: int | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise TypeError(f"Adaptive() got unexpected keyword arguments {sorted(kwargs)}")
        per_worker = max(1, int(getattr(cluster, "threads_per_worker", 1) or 1))
        if minimum_cores is not None:
            minimum = max(minimum, math.ceil(minimum_cores / per_worker))
        if maximum_cores is not None:
            maximum = min(maximum, maximum_cores // per_worker)
        self.cluster = cluster
        self.interval = float(parse_timedelta(interval))
        self.policy = AdaptivePolicy(
            minimum=int(minimum),
            maximum=maximum,
            wait_count=int(wait_count),
            target_duration=float(parse_timedelta(target_duration)),
        )
        self.log: list[tuple[float, Decision]] = []  # the decisions acted on (bounded)
        self._scope: trio.CancelScope | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    @property
    def minimum(self) -> int:
        return self.policy.minimum

    @property
    def maximum(self) -> float:
        return self.policy.maximum

    def __repr__(self) -> str:
        return f"<Adaptive minimum={self.minimum} maximum={self.maximum} interval={self.interval}s>"

    async def adapt(self) -> Decision:
        """One step: look at the scheduler, decide, act. Returns the decision."""
        scheduler = self.cluster.scheduler
        if scheduler is None:
            return Decision("same")
        decision = self.policy.step(backlog_of(scheduler.state), planned=len(self.cluster.workers))
        if decision.status == "up":
            await self.cluster.scale_to(decision.n)
        elif decision.status == "down":
            await self.cluster.retire(list(decision.workers))
        if decision.status != "same":
            logger.info("adaptive: %s", decision)
            self.log.append((trio.current_time(), decision))
            del self.log[:-1000]
        return decision

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Step every ``interval`` until ``stop()`` (or the cluster closes)."""
        with trio.CancelScope() as scope:
            self._scope = scope
            self._token = trio.lowlevel.current_trio_token()
            task_status.started()
            while True:
                try:
                    await self.adapt()
                except Exception:
                    logger.exception("adaptive: a step failed; trying again in %ss", self.interval)
                await trio.sleep(self.interval)

    def stop(self) -> None:
        """Stop adapting; the workers stay as they are. From any thread."""
        scope, token = self._scope, self._token
        if scope is None or token is None:
            return
        try:
            here = trio.lowlevel.current_trio_token()
        except RuntimeError:
            here = None
        if here is token:
            scope.cancel()
        else:  # a sync cluster's user thread: the loop runs in another
            try:
                trio.from_thread.run_sync(scope.cancel, trio_token=token)
            except trio.RunFinishedError:
                pass
