"""``performance_report(filename=)``: dask's context manager, writing a self-contained HTML
file with the task stream and per-prefix progress of the work done inside the block.

On entry the scheduler starts recording its task stream (it records anyway while a
dashboard runs); on exit the client fetches the entries that ended since, the scheduler
stops recording for it (both through ``run_on_scheduler``, dask's public way in), and
``trioscheduler.http.report`` renders the file (Bokeh,
inlined: it opens offline). Works as ``with`` around a sync client and as
``async with`` inside trio; it needs the ``dashboard`` extra (Bokeh).
"""

from __future__ import annotations

import os
from typing import Any

import trio

from trioscheduler.client.client import Client, default_client
from trioscheduler.http import require_dashboard

__all__ = ["performance_report"]

HEARTBEAT_WAIT = 3.0  # seconds; workers beat every second by default


class performance_report:  # noqa: N801 - dask's name
    def __init__(
        self,
        filename: str | os.PathLike[str] = "dask-report.html",
        stacklevel: int = 1,
        mode: str | None = None,
        storage_options: dict[str, Any] | None = None,
        *,
        client: Client | None = None,
    ) -> None:
        if mode not in (None, "inline"):
            raise ValueError(
                f"performance_report(mode={mode!r}): only 'inline' (a self-contained file) "
                "is supported here"
            )
        if storage_options:
            raise ValueError(
                "performance_report(storage_options=...) is not supported: the file is "
                "written locally"
            )
        require_dashboard()
        self.filename = os.fspath(filename)
        self._client = client
        self._start = 0.0

    def _get_client(self) -> Client:
        return self._client if self._client is not None else default_client()

    # -- sync ------------------------------------------------------------------------

    def __enter__(self) -> performance_report:
        self._start = self._get_client().run_on_scheduler(_record, "start")
        return self

    def __exit__(self, *exc_info: Any) -> None:
        rows = self._get_client().run_on_scheduler(_record, "stop", self._start)
        self._write(rows)

    # -- async -----------------------------------------------------------------------

    async def __aenter__(self) -> performance_report:
        self._start = await self._get_client().run_on_scheduler(_record, "start")
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        rows = await self._get_client().run_on_scheduler(_record, "stop", self._start)
        await trio.to_thread.run_sync(self._write, rows)

    def _write(self, rows: list[list[Any]]) -> None:
        import time

        from trioscheduler.http.report import render_report

        text = render_report(
            rows, start=self._start, stop=time.time(), title="Dask Performance Report"
        )
        with open(self.filename, "w", encoding="utf-8") as f:
            f.write(text)


async def _record(action: str, start: float = 0.0, dask_scheduler: Any = None) -> Any:
    """Runs in the scheduler: ``"start"`` recording (returns its ``time.time()``), or
    ``"stop"`` it and return the task-stream rows that ended since ``start``.

    Workers report their transfers with their heartbeats, so ``"stop"`` first waits
    (up to ``HEARTBEAT_WAIT`` s) for a heartbeat of every worker sent after the block."""
    import time

    from trioscheduler.http.report import task_stream_rows

    stream = dask_scheduler.task_stream
    if action == "start":
        stream.wanted += 1
        return time.time()
    stop = time.time()
    with trio.move_on_after(HEARTBEAT_WAIT):
        while any(  # noqa: ASYNC110 - no event marks a heartbeat; polled, bounded
            ws.metrics.get("time", 0.0) < stop for ws in dask_scheduler.state.workers.values()
        ):
            await trio.sleep(0.05)
    stream.wanted = max(stream.wanted - 1, 0)
    return task_stream_rows(list(stream.since(start)))
