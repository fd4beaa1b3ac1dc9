"""The Bokeh pages: static documents built once, fed by one JSON poll per page.

There is no Bokeh server and no websocket. Each page is made with
``bokeh.embed.components`` the first time it is asked for (in a worker thread: importing
bokeh takes ~0.5 s) and then served from memory. Its data sources are plain
``ColumnDataSource``s with a ``name``; a small script fetches the page's JSON (one
request per interval for the whole page, answered from the shared snapshot, with an
ETag so an unchanged state costs an empty 304) and assigns each named source's
``data``, figure titles and the plain-HTML summary. Tests and screen readers read the
same names: ``Bokeh.documents[0].get_model_by_name('progress_source').data``.

Only ``bokeh.min.js`` is loaded for ``/status`` (plus widgets and tables for the table of
``/workers``); never mathjax.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

__all__ = ["NAV", "Page", "build_page", "render"]

NAV: tuple[tuple[str, str], ...] = (
    ("Status", "/status"),
    ("Workers", "/workers"),
    ("Info", "/info/main/workers.html"),
    ("Logs", "/info/main/logs.html"),
    ("JSON API", "/json/index.html"),
    ("Metrics", "/metrics"),
    ("Health", "/health"),
)

POLL_MS = 500
PROGRESS_ROWS = 10  # prefixes visible at once in the progress plot (newest on top)


@dataclass(slots=True)
class Page:
    title: str
    script: str  # bokeh's <script> from components()
    div: str
    bundles: tuple[str, ...]  # bokeh JS files the page needs
    data_url: str  # what the page polls
    summary: str  # plain HTML above the plots


def build_page(name: str) -> Page:
    """Build ``status`` or ``workers`` (blocking: imports bokeh; call in a thread)."""
    if name == "status":
        return _status_page()
    if name == "workers":
        return _workers_page()
    raise KeyError(name)


def _status_page() -> Page:
    from bokeh.embed import components
    from bokeh.layouts import column, row
    from bokeh.models import (
        ColumnDataSource,
        DataRange1d,
        HoverTool,
        NumeralTickFormatter,
        Range1d,
    )
    from bokeh.plotting import figure

    def source(name: str, *columns: str) -> ColumnDataSource:
        return ColumnDataSource({c: [] for c in columns}, name=name)

    tools = "pan,wheel_zoom,box_zoom,reset"
    cluster = source("cluster_memory_source", "y", "bytes", "text")
    p_cluster = figure(
        name="cluster_memory", title="Bytes stored", height=100, width=440, tools="",
        toolbar_location=None, x_range=DataRange1d(start=0), y_range=Range1d(start=-0.5, end=0.5),
    )  # fmt: skip
    p_cluster.hbar(y="y", left=0, right="bytes", height=0.8, color="#1f77b4", source=cluster)
    p_cluster.xaxis.formatter = NumeralTickFormatter(format="0.0 b")
    p_cluster.yaxis.visible = False

    mem = source(
        "memory_source", "y", "name", "address", "managed", "unmanaged", "spilled", "limit",
        "managed_right", "unmanaged_right", "spilled_right", "text",
    )  # fmt: skip
    p_mem = figure(
        name="workers_memory", title="Bytes stored per worker (managed, unmanaged, spilled)",
        height=260, width=440, tools=tools, x_range=DataRange1d(start=0),
    )  # fmt: skip
    p_mem.hbar(y="y", left=0, right="managed_right", height=0.8, color="#1f77b4", source=mem)
    p_mem.hbar(
        y="y", left="managed_right", right="unmanaged_right", height=0.8, color="#9ecae1",
        source=mem,
    )  # fmt: skip
    p_mem.hbar(
        y="y", left="unmanaged_right", right="spilled_right", height=0.8, color="#969696",
        source=mem,
    )  # fmt: skip
    p_mem.xaxis.formatter = NumeralTickFormatter(format="0.0 b")
    p_mem.text(x=0, y="y", text="text", text_baseline="middle", text_font_size="11px", source=mem)
    p_mem.yaxis.visible = False
    p_mem.add_tools(HoverTool(tooltips=[("worker", "@address"), ("", "@text")]))

    proc = source("processing_source", "y", "name", "processing", "executing", "text")
    p_proc = figure(
        name="processing", title="Tasks processing per worker (backlog)", height=240,
        width=440, tools=tools, x_range=DataRange1d(start=0),
    )  # fmt: skip
    p_proc.hbar(y="y", left=0, right="processing", height=0.8, color="#2ca02c", source=proc)
    p_proc.text(x=0, y="y", text="text", text_baseline="middle", text_font_size="11px", source=proc)
    p_proc.yaxis.visible = False
    p_proc.add_tools(HoverTool(tooltips=[("worker", "@name"), ("processing", "@processing")]))

    stream = source(
        "task_stream_source", "lane", "start", "stop", "key", "name", "kind", "worker", "color"
    )
    p_stream = figure(
        name="task_stream", title="Task stream (transfers in red)", height=300, width=820,
        tools=tools, x_axis_type="datetime", x_range=DataRange1d(follow="end",
        follow_interval=20_000, range_padding=0),
    )  # fmt: skip
    p_stream.hbar(
        y="lane", left="start", right="stop", height=0.8, color="color", line_color=None,
        source=stream,
    )  # fmt: skip
    p_stream.yaxis.visible = False
    p_stream.add_tools(
        HoverTool(tooltips=[("key", "@key"), ("kind", "@kind"), ("worker", "@worker")])
    )

    prog = source(
        "progress_source", "y", "name", "all", "done", "memory", "erred", "released",
        "processing", "queued", "waiting", "no_worker", "label", "color", "erred_right",
        "memory_right", "released_right", "processing_right", "queued_right", "waiting_right",
    )  # fmt: skip
    p_prog = figure(
        name="task_progress", title="Progress", height=340, width=820, tools="",
        toolbar_location=None, x_range=Range1d(start=0, end=1),
        y_range=Range1d(start=-PROGRESS_ROWS + 0.5, end=0.5),
    )  # fmt: skip
    bar: dict[str, Any] = {"y": "y", "height": 0.8, "source": prog}
    p_prog.hbar(left=0, right="erred_right", color="#000000", **bar)
    p_prog.hbar(left="erred_right", right="memory_right", color="color", **bar)
    p_prog.hbar(left="memory_right", right="released_right", color="color", alpha=0.4, **bar)
    p_prog.hbar(left="released_right", right="processing_right", color="#888888", **bar)
    p_prog.hbar(
        left="processing_right", right="queued_right", color="#cccccc", hatch_pattern="/",
        **bar,
    )  # fmt: skip
    p_prog.hbar(left="queued_right", right="waiting_right", color="#eeeeee", **bar)
    p_prog.text(
        x=0.01, y="y", text="label", text_baseline="middle", text_font_size="11px",
        source=prog,
    )  # fmt: skip
    p_prog.xaxis.visible = p_prog.yaxis.visible = False
    p_prog.add_tools(
        HoverTool(
            tooltips=[("prefix", "@name"), ("done / all", "@done / @all"),
                      ("memory", "@memory"), ("processing", "@processing"),
                      ("queued", "@queued"), ("erred", "@erred")]
        )
    )  # fmt: skip

    layout = row(column(p_cluster, p_mem, p_proc), column(p_stream, p_prog))
    script, div = components(layout)
    summary = (
        '<p class="summary">Tasks done: <span id="tasks-done">-</span> of '
        '<span id="tasks-total">-</span> &middot; workers: <span id="workers">-</span> '
        '&middot; threads: <span id="threads">-</span></p>'
    )
    return Page("Status", script, div, ("bokeh.min.js",), "/json/page-status.json", summary)


def _workers_page() -> Page:
    from bokeh.embed import components
    from bokeh.models import ColumnDataSource
    from bokeh.models.widgets import DataTable, TableColumn

    fields = (
        ("name", "Name"), ("address", "Address"), ("nthreads", "Threads"),
        ("memory_text", "Memory"), ("limit_text", "Limit"), ("managed_text", "Managed"),
        ("spilled_text", "Spilled"), ("executing", "Executing"), ("in_memory", "In memory"),
        ("processing", "Processing"), ("cpu", "CPU %"), ("last_seen", "Last seen (s)"),
        ("status", "Status"),
    )  # fmt: skip
    from trioscheduler.http.snapshot import _WORKER_COLUMNS

    src = ColumnDataSource({c: [] for c in _WORKER_COLUMNS}, name="workers_source")
    table = DataTable(
        name="workers_table",
        source=src,
        columns=[
            TableColumn(field=f, title=t, width=230 if f == "address" else 90) for f, t in fields
        ],
        width=1200,
        height=420,
        index_position=None,
        reorderable=False,
    )
    script, div = components(table)
    summary = '<p class="summary">Workers: <span id="workers">-</span></p>'
    return Page(
        "Workers",
        script,
        div,
        ("bokeh.min.js", "bokeh-widgets.min.js", "bokeh-tables.min.js"),
        "/json/page-workers.json",
        summary,
    )


_STYLE = """
body { font-family: sans-serif; margin: 0; color: #222; }
nav { background: #333; padding: 6px 12px; }
nav a { color: #eee; margin-right: 16px; text-decoration: none; }
nav a.here { color: #fff; font-weight: bold; }
main { padding: 8px 12px; }
.summary { margin: 4px 0 8px; }
table.info { border-collapse: collapse; }
table.info td, table.info th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
pre.logs { background: #f6f6f6; padding: 8px; }
"""

_POLLER = """
<script>
(function () {
  const url = %(url)s, every = %(every)d;
  let etag = null;
  function apply(doc, data) {
    for (const [name, columns] of Object.entries(data.sources || {})) {
      const model = doc.get_model_by_name(name);
      if (model) model.data = columns;
    }
    for (const [name, text] of Object.entries(data.titles || {})) {
      const model = doc.get_model_by_name(name);
      if (model && model.title) model.title.text = text;
    }
    for (const [id, text] of Object.entries(data.text || {})) {
      const el = document.getElementById(id);
      if (el) el.textContent = text;
    }
  }
  async function tick() {
    const doc = window.Bokeh && Bokeh.documents && Bokeh.documents[0];
    if (!doc) { setTimeout(tick, 50); return; }
    try {
      const response = await fetch(url, {headers: etag ? {"If-None-Match": etag} : {},
                                         cache: "no-store"});
      if (response.status === 200) {
        etag = response.headers.get("ETag");
        apply(doc, await response.json());
      }
    } catch (e) { /* the scheduler is gone or busy: try again next time */ }
    setTimeout(tick, every);
  }
  tick();
})();
</script>
"""


def page_head(title: str, here: str, extra_head: str = "") -> str:
    links = "".join(
        f'<a href="{href}"{" class=here" if href == here else ""}>{html.escape(text)}</a>'
        for text, href in NAV
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)} - trioscheduler</title><style>{_STYLE}</style>"
        f'<link rel="icon" href="data:,">{extra_head}</head><body><nav>{links}</nav><main>'
    )


def page_tail() -> str:
    return "</main></body></html>"


def render(page: Page, here: str, versions: dict[str, str]) -> str:
    """The page's HTML; ``versions``: bundle file -> content hash (cache buster)."""
    import json

    scripts = "".join(
        f'<script src="/static/js/{name}?v={versions[name]}"></script>' for name in page.bundles
    )
    return (
        page_head(page.title, here, scripts)
        + page.summary
        + page.div
        + page.script
        + _POLLER % {"url": json.dumps(page.data_url), "every": POLL_MS}
        + page_tail()
    )
