"""The dashboard's HTTP side, over real sockets: routes, JSON values, /metrics, limits,
hostile input, the extra missing, the CLI flags. The pages in a browser:
``test_dashboard_browser.py``."""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
import trio

from trioscheduler import Client, open_cluster
from trioscheduler.core import messages as m
from trioscheduler.http import (
    DEFAULT_DASHBOARD_ADDRESS,
    format_dashboard_link,
    parse_dashboard_address,
    resolve_dashboard_address,
)
from trioscheduler.http.pages import NAV
from trioscheduler.http.snapshot import SnapshotCache
from trioscheduler.http.task_stream import TaskStream

TIMEOUT = 60
ROOT = Path(__file__).resolve().parent.parent


def fetch(
    base: str, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """One request, no redirect following, 4xx/5xx returned (not raised): blocking."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


async def aget(base: str, path: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
    return await trio.to_thread.run_sync(lambda: fetch(base, path, **kwargs))


def base_of(link: str | None) -> str:
    assert link is not None and link.endswith("/status")
    return link[: -len("/status")]


def inc(x: int) -> int:
    return x + 1


def log_warning(text: str) -> None:
    logging.getLogger("trioscheduler.worker").warning("%s", text)


def fail(x: int) -> int:
    raise ValueError(f"bad {x}")


# --------------------------------------------------------------------------------------
# pure parts
# --------------------------------------------------------------------------------------


def test_dashboard_addresses() -> None:
    assert parse_dashboard_address(":8787", "127.0.0.1") == ("127.0.0.1", 8787)
    assert parse_dashboard_address("8787", "10.0.0.1") == ("10.0.0.1", 8787)
    assert parse_dashboard_address(0, "127.0.0.1") == ("127.0.0.1", 0)
    assert parse_dashboard_address("0.0.0.0:9000", "127.0.0.1") == ("0.0.0.0", 9000)
    assert parse_dashboard_address("http://[::1]:9000/", "x") == ("::1", 9000)
    with pytest.raises(ValueError, match="dashboard_address 'nonsense'"):
        parse_dashboard_address("nonsense", "h")
    with pytest.raises(ValueError, match="out of range"):
        parse_dashboard_address(":70000", "h")
    with pytest.raises(ValueError, match="dashboard_address 'x:y'"):
        resolve_dashboard_address("x:y")  # at construction, not when the cluster starts
    with pytest.raises(TypeError, match="dashboard_address must be"):
        resolve_dashboard_address(["8787"])  # type: ignore[arg-type]
    assert resolve_dashboard_address(None) is None
    assert format_dashboard_link("127.0.0.1", 8787) == "http://127.0.0.1:8787/status"
    assert format_dashboard_link("0.0.0.0", 1, "10.1.2.3") == "http://10.1.2.3:1/status"
    assert format_dashboard_link("::1", 5) == "http://[::1]:5/status"
    assert DEFAULT_DASHBOARD_ADDRESS == ":8787"


def test_task_stream_lanes_and_transfers() -> None:
    stream = TaskStream()
    done = m.TaskFinished("s", 0.0, "tcp://w:1", "inc-1", 8, "int", 10.0, 11.0)
    stream.observe(done)
    assert not stream.entries  # nobody wants it: nothing recorded
    stream.wanted = 1
    for key, start, stop in (("inc-1", 10.0, 11.0), ("inc-2", 10.5, 11.5), ("inc-3", 11.0, 12.0)):
        stream.observe(m.TaskFinished("s", 0.0, "tcp://w:1", key, 8, "int", start, stop))
    # two overlapping tasks take two lanes; the third starts when the first lane is free
    assert [e.lane for e in stream.entries] == [0, 1, 0]
    stream.observe(
        m.WorkerHeartbeat(
            "s", 0.0, "tcp://w:2", {"transfers": [[12.0, 12.5, "tcp://w:1", 1000, [["x", 1]], 1]]}
        )
    )
    transfer = stream.entries[-1]
    assert (transfer.kind, transfer.prefix, transfer.nbytes, transfer.peer) == (
        "transfer", "x", 1000, "tcp://w:1",
    )  # fmt: skip
    assert transfer.lane == 2  # a lane of the other worker
    stream.observe(m.WorkerHeartbeat("s", 0.0, "tcp://w:2", {"transfers": [["junk"]]}))
    assert len(stream.entries) == 4  # a malformed record is dropped, not fatal
    assert stream.compute_seconds == {"inc": 3.0}
    assert stream.transfer_bytes == {"tcp://w:2": 1000}


async def test_snapshot_is_shared_until_it_is_old() -> None:
    """However many pages poll, the state is read once per ``max_age``, and each JSON
    body is encoded once per snapshot."""
    async with open_cluster(1, processes=False, dashboard_address=None) as cluster:
        assert cluster.scheduler is not None
        now = [0.0]
        cache = SnapshotCache(cluster.scheduler, lambda: now[0], lambda: 0.0, max_age=0.2)
        first = cache.get()
        assert cache.get() is first and cache.builds == 1
        body = first.body("/json/counts.json", lambda: first.counts)
        assert first.body("/json/counts.json", lambda: {"other": 1}) is body
        now[0] = 0.25
        assert cache.get() is not first and cache.builds == 2


# --------------------------------------------------------------------------------------
# a running dashboard
# --------------------------------------------------------------------------------------


async def test_routes_values_and_metrics() -> None:
    """Every route dask users expect answers, with the cluster's numbers."""
    from prometheus_client.parser import text_string_to_metric_families

    with trio.fail_after(TIMEOUT):
        async with (
            open_cluster(2, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as cluster,
            Client(cluster, asynchronous=True) as client,
        ):  # fmt: skip
            link = client.dashboard_link
            assert link == cluster.dashboard_link
            assert link is not None and link.startswith("http://127.0.0.1:")
            assert f"dashboard={link!r}" in repr(client) and link in client._repr_html_()
            info = await client.scheduler_info()
            assert info["services"]["dashboard"] == int(link.rsplit(":", 1)[1].split("/")[0])
            base = base_of(link)

            futures = client.map(inc, range(50))
            await client.gather(futures)
            bad = client.submit(fail, 1)
            with pytest.raises(ValueError):
                await bad

            status, headers, _ = await aget(base, "/")
            assert status == 302 and headers["location"] == "/status"
            assert (await aget(base, "/health"))[2] == b"ok"

            counts = json.loads((await aget(base, "/json/counts.json"))[2])
            assert counts["memory"] == 50 and counts["erred"] == 1 and counts["tasks"] == 51
            assert counts["workers"] == 2 and counts["cores"] == 2 and counts["clients"] == 1

            progress = json.loads((await aget(base, "/json/progress.json"))[2])
            rows = {name: i for i, name in enumerate(progress["name"])}
            assert progress["done"][rows["inc"]] == progress["all"][rows["inc"]] == 50
            assert progress["erred"][rows["fail"]] == 1

            # the workers' heartbeats (memory, executing, ...) reach the page
            async def heartbeats_seen() -> bool:
                rows = json.loads((await aget(base, "/json/workers.json"))[2])
                return all(w["memory"] > 0 for w in rows)

            while not await heartbeats_seen():  # noqa: ASYNC110 - polling, as a page does
                await trio.sleep(0.1)

            identity = json.loads((await aget(base, "/json/identity.json"))[2])
            assert identity["address"] == cluster.scheduler_address
            assert sorted(identity["workers"]) == sorted(info["workers"])

            status, _, text = await aget(base, "/metrics")
            assert status == 200
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text.decode())
                for s in family.samples
            }
            assert samples[("dask_scheduler_tasks", (("state", "memory"),))] == 50
            assert samples[("dask_scheduler_tasks", (("state", "erred"),))] == 1
            assert samples[("dask_scheduler_clients", ())] == 1
            assert sum(v for (n, _), v in samples.items() if n == "dask_scheduler_workers") == 2
            assert (
                "dask_scheduler_tasks_compute_seconds_total",
                (("task_prefix_name", "inc"),),
            ) in samples

            # every link of the navigation and of the sitemap answers 200 (dask: /groups 500s)
            sitemap = json.loads((await aget(base, "/sitemap.json"))[2])["paths"]
            worker = sorted(info["workers"])[0]
            paths = {href for _, href in NAV} | {
                p for p in sitemap if "<" not in p and p not in ("/", "/info")
            }
            paths.add("/info/worker/" + quote(worker, safe="") + ".html")
            for path in sorted(paths):
                status, _, body = await aget(base, path)
                assert status == 200, (path, status, body[:200])
            status, _, body = await aget(base, "/info/worker/" + quote(worker, safe="") + ".html")
            assert worker.encode() in body
            assert (await aget(base, "/info/worker/tcp%3A%2F%2Fnowhere%3A1.html"))[0] == 404
            # a worker's logs, asked of the worker (its data server's get_logs)
            await client.run(log_warning, "a line for the dashboard", workers=[worker])
            status, _, body = await aget(base, "/info/logs/" + quote(worker, safe="") + ".html")
            assert status == 200 and b"a line for the dashboard" in body
            assert (await aget(base, "/info/logs/tcp%3A%2F%2Fnowhere%3A1.html"))[0] == 404
            assert (await aget(base, "/no/such/page"))[0] == 404


async def test_static_bokehjs_gzip_cache_and_traversal() -> None:
    import bokeh

    with trio.fail_after(TIMEOUT):
        async with open_cluster(1, processes=False, dashboard_address="127.0.0.1:0") as cluster:
            base = base_of(cluster.dashboard_link)
            status, headers, body = await aget(
                base, "/static/js/bokeh.min.js", headers={"Accept-Encoding": "gzip"}
            )
            assert status == 200 and headers["content-encoding"] == "gzip"
            assert "immutable" in headers["cache-control"]
            assert len(body) < 600_000
            import gzip

            assert f'version="{bokeh.__version__}"'.encode() in gzip.decompress(body) or (
                bokeh.__version__.encode() in gzip.decompress(body)
            )
            plain = await aget(base, "/static/js/bokeh.min.js")
            assert "content-encoding" not in plain[1] and len(plain[2]) > len(body)
            for path in (
                "/static/js/../../x", "/static/js/%2e%2e/x", "/static/js/%2e%2e%2fsetup.py",
                "/static/js/compiler.js", "/static/js/nothing.min.js",
                "/static/js/bokeh-mathjax.min.js",
            ):  # fmt: skip
                assert (await aget(base, path))[0] == 404, path
            # the page names only what it needs, with a cache buster; never mathjax
            page = (await aget(base, "/status"))[2].decode()
            assert "/static/js/bokeh.min.js?v=" in page and "mathjax" not in page
            # an unchanged snapshot is an empty 304
            first = await aget(base, "/json/progress.json")
            again = await aget(
                base, "/json/progress.json", headers={"If-None-Match": first[1]["etag"]}
            )
            assert again[0] == 304 and again[2] == b""


async def test_hostile_input_closes_only_its_connection() -> None:
    """Garbage, oversized heads and bodies, wrong methods and a flood of idle connections
    each get a 4xx or a closed connection; a client computing meanwhile is unaffected."""

    async def raw(port: int, data: bytes) -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            try:
                await stream.send_all(data)
            except trio.BrokenResourceError:
                return b""
            out = b""
            with trio.move_on_after(10):
                while True:
                    try:
                        chunk = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        break
                    if not chunk:
                        break
                    out += chunk
            return out

    with trio.fail_after(TIMEOUT):
        async with (
            open_cluster(1, processes=False, dashboard_address="127.0.0.1:0") as cluster,
            Client(cluster, asynchronous=True) as client,
        ):  # fmt: skip
            assert cluster.scheduler is not None and cluster.scheduler.dashboard is not None
            port = cluster.scheduler.dashboard.port
            server = cluster.scheduler.dashboard.server
            base = base_of(cluster.dashboard_link)
            work = client.map(inc, range(200))

            assert (await raw(port, b"\x00\xff garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
            assert (
                await raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 40_000 + b"\r\n\r\n")
            ).startswith(b"HTTP/1.1 431")
            big = (
                b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n"
                + b"x" * 200_000
            )
            assert (await raw(port, big)).startswith(b"HTTP/1.1 413")
            assert (await aget(base, "/health", method="POST"))[0] == 405
            assert (await raw(port, b"GET /health HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 400")

            # many idle connections at once: the ones over the limit are closed at once
            server.limits.max_connections = 20
            streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(30)]
            try:
                await trio.sleep(0.2)
                assert server.open_connections == 20
                closed = 0
                for s in streams[20:]:
                    with trio.move_on_after(5):
                        if await s.receive_some(10) == b"":
                            closed += 1
                assert closed == 10
            finally:
                for s in streams:
                    await s.aclose()
            with trio.move_on_after(5):
                while server.open_connections:  # noqa: ASYNC110 - the server's own count
                    await trio.sleep(0.01)
            assert server.open_connections == 0

            assert await client.submit(sum, work) == sum(range(1, 201))
            assert (await aget(base, "/health"))[2] == b"ok"
            assert (await aget(base, "/status"))[0] == 200


async def test_dashboard_port_in_use_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with (
            caplog.at_level(logging.WARNING, logger="trioscheduler.http"),
            trio.fail_after(TIMEOUT),
        ):
            async with open_cluster(1, processes=False, dashboard_address=f"127.0.0.1:{port}") as c:
                link = c.dashboard_link
                assert link is not None and f":{port}/" not in link
                assert (await aget(base_of(link), "/health"))[2] == b"ok"
        assert f"port {port} is in use" in caplog.text


async def test_no_dashboard_binds_nothing_and_imports_nothing() -> None:
    """``dashboard_address=None``: no port, no link; and a running dashboard imports
    bokeh only when a page is first asked for (not at scheduler start)."""
    code = """
import sys, json, urllib.request
from trioscheduler import Client, LocalCluster
with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster, Client(cluster) as c:
    assert c.dashboard_link is None and cluster.dashboard_link is None
    assert "dashboard=" not in repr(c)
    assert c.scheduler_info()["services"] == {}
    assert "h11" not in sys.modules and "bokeh" not in sys.modules
with LocalCluster(n_workers=1, processes=False, dashboard_address="127.0.0.1:0") as cluster:
    base = cluster.dashboard_link[: -len("/status")]
    json.load(urllib.request.urlopen(base + "/json/counts.json"))
    assert urllib.request.urlopen(base + "/metrics").status == 200
    assert "bokeh" not in sys.modules, "bokeh imported before any page was asked for"
    assert urllib.request.urlopen(base + "/status").status == 200
    assert "bokeh" in sys.modules
print("ok")
"""
    result = await trio.run_process(
        [sys.executable, "-c", code], capture_stdout=True, capture_stderr=True, check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.strip() == b"ok"


async def test_missing_extra_named_or_quietly_off() -> None:
    """Without the extra: the default means "no dashboard" (no error, as dask); asking
    for one explicitly raises an error that names the extra."""
    code = """
import sys
sys.modules["bokeh"] = None  # as if not installed: find_spec and import both fail
from trioscheduler import Client, LocalCluster
from trioscheduler.http import DashboardUnavailableError
with LocalCluster(n_workers=1, processes=False) as cluster, Client(cluster) as c:
    assert cluster.dashboard_link is None and c.dashboard_link is None
try:
    LocalCluster(n_workers=1, processes=False, dashboard_address=":0")
except DashboardUnavailableError as exc:
    assert isinstance(exc, ImportError)
    print(exc)
else:
    raise AssertionError("no error")
from trioscheduler import performance_report
try:
    performance_report("x.html")
except DashboardUnavailableError as exc:
    assert "trioscheduler[dashboard]" in str(exc)
else:
    raise AssertionError("no error")
"""
    result = await trio.run_process(
        [sys.executable, "-c", code], capture_stdout=True, capture_stderr=True, check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert "pip install 'trioscheduler[dashboard]'" in out and "bokeh not installed" in out


async def test_cli_dashboard_flags(tmp_path: Path) -> None:
    """``trioscheduler scheduler --dashboard-address`` prints the link and serves it;
    ``--no-dashboard`` serves none."""

    async def start(*args: str) -> tuple[trio.Process, list[str]]:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "trioscheduler", "scheduler", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert proc.stdout is not None
        text = b""
        while b"scheduler at" not in text or not text.endswith(b"\n"):
            text += await proc.stdout.receive_some(4096)
        with trio.move_on_after(0.5):  # the dashboard line follows at once, if any
            while b"dashboard at" not in text:
                text += await proc.stdout.receive_some(4096)
        return proc, text.decode().splitlines()

    with trio.fail_after(TIMEOUT):
        proc, lines = await start("--dashboard-address", "127.0.0.1:0")
        try:
            link = next(line.split()[-1] for line in lines if line.startswith("dashboard at"))
            assert (await aget(base_of(link), "/health"))[2] == b"ok"
        finally:
            proc.kill()
            await proc.wait()
        proc, lines = await start("--no-dashboard")
        try:
            assert not any("dashboard" in line for line in lines), lines
        finally:
            proc.kill()
            await proc.wait()


async def test_log_buffers_keep_warnings_on_stderr() -> None:
    """The dashboard's and the workers' log buffers are handlers; in a program that
    configured no logging, warnings still reach stderr (logging's last resort), once."""
    code = """
import logging
from trioscheduler import LocalCluster
with LocalCluster(n_workers=2, processes=False, dashboard_address="127.0.0.1:0") as cluster:
    logging.getLogger("trioscheduler.test").warning("still on stderr")
    logging.getLogger("trioscheduler.test").info("not shown")
"""
    result = await trio.run_process(
        [sys.executable, "-c", code], capture_stdout=True, capture_stderr=True, check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr.decode().count("still on stderr") == 1
    assert "not shown" not in result.stderr.decode()


async def test_a_scheduler_alone_keeps_warnings_on_stderr_and_in_its_logs() -> None:
    """No dashboard, no workers: the process's one log buffer is the only handler on
    the ``trioscheduler`` logger, and still hides no warning from logging's last resort
    (it did when the scheduler's logs had a buffer of their own); configured logging
    shows each warning once, and the buffer keeps it for ``get_scheduler_logs``."""
    code = """
import logging, sys, trio
from trioscheduler.server.diagnostics import recent_logs
from trioscheduler.server.scheduler import Scheduler
if sys.argv[1] == "configured":
    logging.basicConfig(format="configured: %(message)s")
async def main():
    async with Scheduler("tcp://127.0.0.1:0"):
        logging.getLogger("trioscheduler.test").warning("still on stderr")
        logging.getLogger("trioscheduler.test").info("not shown")
        print([level for level, line in recent_logs() if "still on stderr" in line])
trio.run(main)
"""
    for mode in ("bare", "configured"):
        result = await trio.run_process(
            [sys.executable, "-c", code, mode], capture_stdout=True, capture_stderr=True,
            check=False,
        )  # fmt: skip
        err = result.stderr.decode()
        assert result.returncode == 0, err
        assert err.count("still on stderr") == 1, (mode, err)
        assert ("configured: still on stderr" in err) == (mode == "configured"), err
        assert "not shown" not in err
        assert result.stdout.decode().strip() == "['WARNING']"
