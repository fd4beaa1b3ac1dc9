"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by playwright;
no browser download), against a real cluster of worker processes.

Values are read back from the Bokeh models by name
(``Bokeh.documents[0].get_model_by_name(...)``), never from pixels. Without
``/usr/bin/chromium`` these tests skip, except under CI (``CI`` set), where they fail:
``.ci/run`` installs it, and a missing install step must not hide behind a green run.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from trioscheduler import Client, LocalCluster, performance_report, wait

CHROMIUM = os.environ.get("TRIOSCHEDULER_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip
IDLE = (
    "() => window.Bokeh && Bokeh.documents && Bokeh.documents.length > 0"
    " && Bokeh.index && Object.values(Bokeh.index).every(v => v.is_idle)"
)

pytestmark = pytest.mark.slow


def _need_browser() -> None:
    if shutil.which(CHROMIUM) is None:
        message = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message + ": CI must install it (.ci/run)")
        pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[LocalCluster, Client]]:
    _need_browser()
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        yield cluster, client


def model(page: Any, name: str, attr: str = "data") -> Any:
    return page.evaluate(f"Bokeh.documents[0].get_model_by_name({name!r}).{attr}")


def until(page: Any, check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``check`` while the page keeps running (``wait_for_timeout``, not sleep:
    playwright's sync API delivers events only inside its own calls)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"the page did not show it in time: {check.__doc__ or ''}")
        page.wait_for_timeout(100)


def open_page(browser: Any, url: str) -> tuple[Any, Any, dict[str, Any]]:
    context = browser.new_context(viewport={"width": 1320, "height": 900})
    page = context.new_page()
    seen: dict[str, Any] = {"errors": [], "responses": [], "bytes": 0}
    page.on("pageerror", lambda exc: seen["errors"].append(str(exc)))
    page.on("response", lambda r: seen["responses"].append((r.url, r.status)))

    def finished(request: Any) -> None:
        sizes = request.sizes()
        seen["bytes"] += sizes["responseBodySize"] + sizes["responseHeadersSize"]

    page.on("requestfinished", finished)
    page.goto(url)
    page.wait_for_function(IDLE)
    return context, page, seen


def gated(x: int, gate: str) -> int:
    """Runs until the test creates the file ``gate``: the page sees the work before and
    after, whatever the machine's speed."""
    while not os.path.exists(gate):
        time.sleep(0.01)
    return x


def inc(x: int) -> int:
    return x + 1


def test_status_progress_stream_and_page_weight(browser: Any, cluster: Any, tmp_path: Path) -> None:
    """Progress counts a known graph live, without reloading; the task stream holds the
    tasks that ran; the first load is small and clean."""
    import bokeh

    c, client = cluster
    done_before = client.map(inc, range(50))
    wait(done_before)
    gate = tmp_path / "gate"
    context, page, seen = open_page(browser, c.dashboard_link)
    try:
        running = client.map(gated, range(40), gate=str(gate))

        def progress(prefix: str) -> dict[str, int]:
            data = model(page, "progress_source")
            if prefix not in data["name"]:
                return {}
            i = data["name"].index(prefix)
            return {k: data[k][i] for k in ("all", "done", "processing", "queued")}

        until(page, lambda: progress("gated").get("all") == 40)
        before = progress("gated")
        assert before["done"] == 0 and before["processing"] + before["queued"] == 40
        gate.touch()
        wait(running)
        until(page, lambda: page.inner_text("#tasks-done") == "90")  # no reload
        assert progress("gated") == {"all": 40, "done": 40, "processing": 0, "queued": 0}
        assert progress("inc")["done"] == progress("inc")["all"] == 50
        title = model(page, "task_progress", "title.text")
        assert "total: 90" in title and "in-memory: 90" in title
        assert page.inner_text("#tasks-total") == "90" and page.inner_text("#workers") == "2"

        # the task stream: a rectangle for each task that ran, on both workers
        until(page, lambda: len(model(page, "task_stream_source")["key"]) >= 90)
        stream = model(page, "task_stream_source")
        keys = {
            k for k, kind in zip(stream["key"], stream["kind"], strict=True) if kind == "compute"
        }
        assert {str(f.key) for f in running + done_before} <= keys
        assert len(set(stream["worker"])) == 2
        assert all(b >= a for a, b in zip(stream["start"], stream["stop"], strict=True))

        # weight: BokehJS once, gzipped, no mathjax, nothing failed, same version
        assert seen["bytes"] <= 600_000, seen["bytes"]
        assert not any("mathjax" in url for url, _ in seen["responses"])
        assert all(status < 400 for _, status in seen["responses"]), seen["responses"]
        assert not seen["errors"], seen["errors"]
        assert page.evaluate("Bokeh.version") == bokeh.__version__
    finally:
        context.close()
        del running, done_before


def test_memory_per_worker_follows_scattered_data(browser: Any, cluster: Any) -> None:
    import numpy as np

    c, client = cluster
    workers = sorted(client.scheduler_info()["workers"])
    size = 24 * 2**20
    data = [
        client.scatter(np.full(size // 8, float(i)), workers=[w]) for i, w in enumerate(workers)
    ]  # one 24 MiB array on each worker (different values: different keys)
    context, page, _ = open_page(browser, c.dashboard_link)
    try:

        def managed() -> dict[str, int]:
            mem = model(page, "memory_source")
            return dict(zip(mem["address"], mem["managed"], strict=True))

        until(page, lambda: sorted(managed()) == workers and min(managed().values()) >= size)
        del data
        until(page, lambda: max(managed().values()) < size // 4)
    finally:
        context.close()


def test_workers_table_follows_the_cluster(browser: Any, cluster: Any) -> None:
    """One row per worker; a worker killed with SIGKILL leaves the table and the one its
    nanny starts instead joins it, without reloading the page."""
    c, client = cluster
    context, page, seen = open_page(browser, c.dashboard_link.replace("/status", "/workers"))
    try:

        def rows() -> list[str]:
            return sorted(model(page, "workers_source")["address"])

        before = sorted(client.scheduler_info()["workers"])
        until(page, lambda: rows() == before)
        nanny = next(n for n in c.workers.values() if n.worker_address == before[0])
        os.kill(nanny.pid, signal.SIGKILL)
        until(page, lambda: before[0] not in rows() and len(rows()) == 2, timeout=30)
        assert before[1] in rows()
        assert sorted(client.scheduler_info()["workers"]) == rows()
        assert not seen["errors"], seen["errors"]
    finally:
        context.close()


def add(a: Any, b: Any) -> Any:
    return a + b


def test_performance_report_file(browser: Any, cluster: Any, tmp_path: Path) -> None:
    """``performance_report`` writes one self-contained file holding the tasks of the
    block (not those before it) and its transfers; it opens offline."""
    import numpy as np

    c, client = cluster
    wait(client.map(inc, range(100, 110)))  # before the block: not in the report
    workers = sorted(client.scheduler_info()["workers"])
    filename = tmp_path / "report.html"
    with performance_report(filename=str(filename)):
        xs = client.map(inc, range(1000, 1020))  # keys no other test made
        a = client.scatter(np.ones(100_000), workers=[workers[0]])
        b = client.scatter(np.zeros(100_000), workers=[workers[1]])
        total = client.submit(add, a, b)  # one input must travel
        assert total.result().sum() == 100_000 and len(client.gather(xs)) == 20
    text = filename.read_text()
    assert "<script src=" not in text  # BokehJS inlined: nothing to fetch
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(filename.as_uri())
        page.wait_for_function(IDLE)
        stream = model(page, "task_stream_source")
        computed = {
            k for k, kind in zip(stream["key"], stream["kind"], strict=True) if kind == "compute"
        }
        assert computed == {str(f.key) for f in [*xs, total]}
        assert stream["kind"].count("transfer") == 1
        progress = model(page, "progress_source")
        assert dict(zip(progress["name"], progress["tasks"], strict=True)) == {"inc": 20, "add": 1}
        assert not errors, errors
    finally:
        context.close()
