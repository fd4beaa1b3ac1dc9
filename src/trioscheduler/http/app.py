"""The dashboard's routes, and ``Dashboard.serve`` which the scheduler shell starts.

Every route reads the one shared ``SnapshotCache``; pages and BokehJS are built or read
once, in a worker thread, and then served from memory. The route table is ``ROUTES``
(exact paths) plus two prefixes (``/static/js/``, ``/info/worker/``); ``/sitemap.json``
and ``/json/index.html`` list them, and a test requests every one.
"""

from __future__ import annotations

import errno
import gzip
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import trio

from trioscheduler.http import logs, parse_dashboard_address
from trioscheduler.http.info import logs_page, worker_page, workers_page
from trioscheduler.http.pages import build_page, render
from trioscheduler.http.server import HttpServer, Request, Response
from trioscheduler.http.snapshot import DashboardSource, Snapshot, SnapshotCache
from trioscheduler.http.static import BokehStatic

__all__ = ["Dashboard", "parse_dashboard_address"]

logger = logging.getLogger("trioscheduler.http")

JSON = "application/json"
HTML = "text/html; charset=utf-8"

JSON_API: dict[str, str] = {
    "/json/counts.json": "global counts (dask's names): tasks by state, workers, cores, bytes",
    "/json/identity.json": "the scheduler's address and each worker's name, threads, memory",
    "/json/progress.json": "one row per task prefix: all, done, memory, processing, queued, erred",
    "/json/workers.json": "one row per worker: memory, limit, managed, spilled, executing, ...",
    "/json/memory.json": "bytes per worker, managed / unmanaged / spilled (stacked bars)",
    "/json/processing.json": "tasks processing per worker",
    "/json/task-stream.json": "the last 1000 task-stream rectangles (start/stop in ms)",
    "/json/page-status.json": "everything /status shows, in one reply (what the page polls)",
    "/json/page-workers.json": "everything /workers shows, in one reply",
}


class Dashboard:
    """Serves ``source`` (the scheduler shell, read through ``DashboardSource``)."""

    def __init__(
        self,
        source: DashboardSource,
        *,
        clock: Callable[[], float] = trio.current_time,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.cache = SnapshotCache(source, clock, wall)
        self.static = BokehStatic()
        self.server = HttpServer(self.handle)
        self.host = ""
        self.port = 0
        self._pages: dict[str, Response] = {}
        self._page_lock = trio.Lock()
        self._metrics: Any = None
        self._routes: dict[str, Callable[[Request], Awaitable[Response]]] = {
            "/": self._root,
            "/status": self._page,
            "/workers": self._page,
            "/health": self._health,
            "/metrics": self._metrics_page,
            "/sitemap.json": self._sitemap,
            "/info": self._info_root,
            "/info/main/workers.html": self._info_workers,
            "/info/main/logs.html": self._info_logs,
            "/json/index.html": self._json_index,
            **dict.fromkeys(JSON_API, self._json),
        }

    # -- serving -----------------------------------------------------------------------

    async def serve(
        self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``host:port`` until cancelled; ``task_status`` gets ``(host, port)``.

        A port in use (a second cluster on dask's 8787) falls back to a free port with a
        warning in the log, as dask does."""
        stream = self.source.task_stream
        async with trio.open_nursery() as nursery:
            try:
                bound = await nursery.start(self.server.serve, host, port)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or port == 0:
                    raise
                bound = await nursery.start(self.server.serve, host, 0)
                logger.warning(
                    "dashboard: port %d is in use (another cluster?); serving on port %d instead",
                    port,
                    bound[1],
                )
            self.host, self.port = bound
            stream.wanted += 1
            logs.install()
            try:
                task_status.started(bound)
                await trio.sleep_forever()
            finally:
                stream.wanted -= 1
                nursery.cancel_scope.cancel()

    async def handle(self, request: Request) -> Response:
        path = request.path
        route = self._routes.get(path)
        if route is not None:
            return await route(request)
        if path.startswith("/static/js/"):
            return await self._static(path[len("/static/js/") :])
        if path.startswith("/info/worker/") and path.endswith(".html"):
            return self._info_worker(path[len("/info/worker/") : -len(".html")])
        if path.startswith("/info/logs/") and path.endswith(".html"):
            return await self._info_worker_logs(path[len("/info/logs/") : -len(".html")])
        return Response(404, f"not found: {path[:200]}\n".encode())

    def snapshot(self) -> Snapshot:
        return self.cache.get()

    # -- routes ------------------------------------------------------------------------

    async def _root(self, request: Request) -> Response:
        return Response(302, b"", headers=[("Location", "/status")])

    async def _health(self, request: Request) -> Response:
        return Response(200, b"ok")

    async def _page(self, request: Request) -> Response:
        name = request.path.strip("/")
        page = self._pages.get(name)
        if page is None:
            async with self._page_lock:  # built once, however many tabs open it first
                page = self._pages.get(name)
                if page is None:
                    page = await trio.to_thread.run_sync(self._build, name)
                    self._pages[name] = page
        return page

    def _build(self, name: str) -> Response:
        page = build_page(name)
        versions = {}
        for bundle in page.bundles:
            entry = self.static.get(bundle)
            if entry is None:
                raise RuntimeError(f"BokehJS file {bundle} is missing from the bokeh package")
            versions[bundle] = entry[2]
        body = render(page, "/" + name, versions).encode()
        return Response(200, body, HTML, gzipped=gzip.compress(body, 6))

    async def _static(self, name: str) -> Response:
        entry = self.static.cached(name)
        if entry is None:
            entry = await trio.to_thread.run_sync(self.static.get, name)
        if entry is None:
            return Response(404, b"no such file\n")
        raw, gz, _version = entry
        return Response(
            200,
            raw,
            "application/javascript",
            headers=[("Cache-Control", "public, max-age=31536000, immutable")],
            gzipped=gz,
        )

    async def _json(self, request: Request) -> Response:
        snap = self.snapshot()
        path = request.path
        builders: dict[str, Callable[[], Any]] = {
            "/json/counts.json": lambda: snap.counts,
            "/json/identity.json": lambda: snap.identity,
            "/json/progress.json": lambda: snap.progress,
            "/json/workers.json": lambda: snap.workers,
            "/json/memory.json": lambda: snap.memory,
            "/json/processing.json": lambda: snap.processing,
            "/json/task-stream.json": lambda: snap.stream,
            "/json/page-status.json": snap.status_payload,
            "/json/page-workers.json": snap.workers_payload,
        }
        raw, gz, etag = snap.body(path, builders[path])
        return Response(
            200, raw, JSON, headers=[("Cache-Control", "no-cache")], gzipped=gz, etag=etag
        )

    async def _metrics_page(self, request: Request) -> Response:
        if self._metrics is None:
            from trioscheduler.http.metrics import MetricsPage

            self._metrics = MetricsPage(self.snapshot, self.source.task_stream)
        from trioscheduler.http.metrics import CONTENT_TYPE

        return Response(200, self._metrics.render(), CONTENT_TYPE)

    async def _sitemap(self, request: Request) -> Response:
        paths = sorted(self._routes) + [
            "/info/worker/<address>.html",
            "/info/logs/<address>.html",
            "/static/js/<file>",
        ]
        return Response(200, json.dumps({"paths": paths}).encode(), JSON)

    async def _json_index(self, request: Request) -> Response:
        from trioscheduler.http.pages import page_head, page_tail

        items = "".join(
            f'<li><a href="{path}">{path}</a>: {text}</li>' for path, text in JSON_API.items()
        )
        body = (
            page_head("JSON API", "/json/index.html")
            + "<h1>JSON API</h1><p>Every page reads these; each reply comes from one shared "
            "snapshot (rebuilt at most every 0.45 s) and carries an ETag.</p>"
            + f"<ul>{items}</ul>"
            + page_tail()
        )
        return Response(200, body.encode(), HTML)

    async def _info_root(self, request: Request) -> Response:
        return Response(302, b"", headers=[("Location", "/info/main/workers.html")])

    async def _info_workers(self, request: Request) -> Response:
        return Response(200, workers_page(self.snapshot()).encode(), HTML)

    async def _info_logs(self, request: Request) -> Response:
        return Response(200, logs_page(logs.install().lines()).encode(), HTML)

    async def _info_worker_logs(self, quoted: str) -> Response:
        address = unquote(quoted)
        if address not in self.source.state.workers:
            return Response(404, f"no worker {address[:200]} is connected\n".encode())
        lines = await self.source.worker_logs(address)
        return Response(200, logs_page(lines, f"Worker {address}").encode(), HTML)

    def _info_worker(self, quoted: str) -> Response:
        address = unquote(quoted)
        ws = self.source.state.workers.get(address)
        processing = [str(k) for k in ws.processing] if ws is not None else []
        body = worker_page(self.snapshot(), address, processing)
        if body is None:
            return Response(404, f"no worker {address[:200]} is connected\n".encode())
        return Response(200, body.encode(), HTML)
