"""Dashboard cost: scheduler-process CPU per open ``/status`` tab, and first-load bytes.

One sample is one fresh subprocess per system (``benchmarks._dashboard_child``: a
2-worker ``LocalCluster`` with its dashboard, idle after 200 small tasks). Headless
Chromium (Debian's ``/usr/bin/chromium``, driven by playwright) opens 0, then 1, then 5
``/status`` tabs, each in a fresh context (nothing cached), waits until Bokeh is idle,
and the scheduler process's CPU time (user + system, ``psutil``) is read over a window
of 10 s (3 s with ``--quick``) at each level. Rows, lower is better, in % of one core:

* ``dashboard-cpu-0tabs``: the idle scheduler with the dashboard on and no tab;
* ``dashboard-cpu-1tab`` / ``dashboard-cpu-5tabs``: with 1 / 5 tabs open;
* ``dashboard-first-load-kB``: bytes over the wire (headers + bodies, as sent: gzip
  where the server compresses) for the first ``/status`` load.

The three CPU rows and the bytes come from the same subprocesses (each row reads each
run once; a row asked for alone runs its own).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from benchmarks._harness import SharedRuns, register

CHROMIUM = os.environ.get("TRIOSCHEDULER_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip
IDLE = (
    "() => window.Bokeh && Bokeh.documents && Bokeh.documents.length > 0"
    " && Bokeh.index && Object.values(Bokeh.index).every(v => v.is_idle)"
)
TABS = (0, 1, 5)

_shared = SharedRuns()  # the rows read the same runs, by system
SAMPLES: list[dict[str, Any]] = []


def _cpu_percent(proc: Any, window: float) -> float:
    before = proc.cpu_times()
    t0 = time.monotonic()
    time.sleep(window)  # the browser runs on its own; nothing here needs its events
    after = proc.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    return 100.0 * used / (time.monotonic() - t0)


def measure(system: str, quick: bool) -> dict[str, float]:
    """One subprocess of ``system`` (``trio`` or ``dask``): CPU at 0/1/5 tabs, bytes."""
    import psutil
    from playwright.sync_api import sync_playwright

    window = 3.0 if quick else 10.0
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks._dashboard_child", system],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        info = json.loads(child.stdout.readline())
        proc = psutil.Process(info["pid"])
        out: dict[str, float] = {}
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            contexts: list[Any] = []
            try:
                time.sleep(1.0)  # start-up settles
                for n in TABS:
                    while len(contexts) < n:
                        context = browser.new_context(viewport={"width": 1400, "height": 900})
                        page = context.new_page()
                        sizes: list[int] = []
                        page.on(
                            "requestfinished",
                            lambda r, s=sizes: s.append(
                                r.sizes()["responseBodySize"] + r.sizes()["responseHeadersSize"]
                            ),
                        )
                        page.goto(info["link"])
                        page.wait_for_function(IDLE, timeout=60_000)
                        page.wait_for_timeout(500)
                        if not contexts:
                            out["first_load_kB"] = sum(sizes) / 1000
                        contexts.append(context)
                    time.sleep(1.0)  # the tabs' own start-up settles
                    out[f"cpu_{n}"] = _cpu_percent(proc, window)
            finally:
                for context in contexts:
                    context.close()
                browser.close()
        SAMPLES.append({"system": system, **out})
        print(f"  {system}: {out}", flush=True)
        return out
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _reader(row: str, field: str, system: str) -> Any:
    def read(quick: bool) -> float:
        return float(_shared.take(row, system, lambda: measure(system, quick))[field])

    return read


for _n, _row in ((0, "dashboard-cpu-0tabs"), (1, "dashboard-cpu-1tab"), (5, "dashboard-cpu-5tabs")):
    register(
        _row,
        ours=_reader(_row, f"cpu_{_n}", "trio"),
        reference=_reader(_row, f"cpu_{_n}", "dask"),
        reference_label="dask.distributed",
        unit="% of a core",
        description=f"scheduler-process CPU, idle 2-worker cluster, {_n} /status tab(s) open",
        higher_is_better=False,
    )
register(
    "dashboard-first-load-kB",
    ours=_reader("dashboard-first-load-kB", "first_load_kB", "trio"),
    reference=_reader("dashboard-first-load-kB", "first_load_kB", "dask"),
    reference_label="dask.distributed",
    unit="kB",
    description="bytes over the wire for the first load of /status (fresh browser context)",
    higher_is_better=False,
)


def screenshots(folder: str) -> None:
    """``python -m benchmarks.dashboard screenshots docs``: the pages mid-run, as PNGs."""
    from pathlib import Path

    import dask.array as da
    from playwright.sync_api import sync_playwright

    from trioscheduler import Client, LocalCluster

    out = Path(folder)
    with (
        LocalCluster(n_workers=2, threads_per_worker=2, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):
        import urllib.request

        assert cluster.dashboard_link is not None
        base = cluster.dashboard_link[: -len("/status")]
        for path in ("/status", "/workers"):  # built once, before the work: shown mid-run
            urllib.request.urlopen(base + path).read()
        x = da.random.random((4000, 4000), chunks=500).persist()
        slow = client.map(_slow, range(1000))
        y = client.compute((x + x.T).sum())
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1320, "height": 780})
            for path, name in (
                ("/status", "dashboard-status.png"),
                ("/workers", "dashboard-workers.png"),
                ("/info/main/workers.html", "dashboard-info.png"),
            ):
                page.goto(base + path)
                page.wait_for_timeout(2500)
                page.screenshot(path=str(out / name), full_page=True)
                print("wrote", out / name)
            browser.close()
        y.result()
        del slow


def _slow(i: int) -> int:
    time.sleep(0.05)
    return i


if __name__ == "__main__":
    if sys.argv[1:2] == ["screenshots"]:
        screenshots(sys.argv[2] if len(sys.argv) > 2 else "docs")
