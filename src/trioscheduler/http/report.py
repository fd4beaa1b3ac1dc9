"""The HTML of ``performance_report``: the task stream and per-prefix progress of a block.

A plain function of the task-stream rows the scheduler returns (``task_stream_rows``),
so the file can be written anywhere the client runs. The file is self-contained: BokehJS
is inlined from the installed ``bokeh`` (no CDN, readable offline, ~1.3 MB).
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from typing import Any

from trioscheduler.http.snapshot import TRANSFER_COLOR, format_bytes, prefix_color
from trioscheduler.http.task_stream import StreamEntry

__all__ = ["ROW_FIELDS", "render_report", "task_stream_rows"]

ROW_FIELDS = ("kind", "key", "prefix", "worker", "start", "stop", "lane", "nbytes", "peer")


def task_stream_rows(entries: Sequence[StreamEntry]) -> list[list[Any]]:
    """Entries as plain lists (``ROW_FIELDS``), for the wire."""
    return [
        [e.kind, e.key, e.prefix, e.worker, e.start, e.stop, e.lane, e.nbytes, e.peer]
        for e in entries
    ]


def render_report(rows: Sequence[Sequence[Any]], *, start: float, stop: float, title: str) -> str:
    """The report page (blocking: imports bokeh)."""
    from bokeh.embed import file_html
    from bokeh.layouts import column
    from bokeh.models import ColumnDataSource, HoverTool
    from bokeh.models.widgets import Div
    from bokeh.plotting import figure
    from bokeh.resources import INLINE

    records = [dict(zip(ROW_FIELDS, row, strict=True)) for row in rows]
    computed = [r for r in records if r["kind"] != "transfer"]
    transfers = [r for r in records if r["kind"] == "transfer"]
    lanes = sorted({r["lane"] for r in records})
    lane_y = {lane: i for i, lane in enumerate(lanes)}

    stream = ColumnDataSource(
        {
            "y": [lane_y[r["lane"]] for r in records],
            "start": [r["start"] * 1000 for r in records],
            "stop": [r["stop"] * 1000 for r in records],
            "key": [r["key"] for r in records],
            "kind": [r["kind"] for r in records],
            "worker": [r["worker"] for r in records],
            "color": [
                TRANSFER_COLOR
                if r["kind"] == "transfer"
                else "#000000"
                if r["kind"] == "erred"
                else prefix_color(r["prefix"])
                for r in records
            ],
        },
        name="task_stream_source",
    )
    p_stream = figure(
        name="task_stream",
        title="Task stream (transfers in red)",
        height=max(200, 30 * len(lanes) + 80),
        width=1000,
        x_axis_type="datetime",
        tools="pan,wheel_zoom,box_zoom,reset",
    )
    p_stream.hbar(
        y="y", left="start", right="stop", height=0.8, color="color", line_color=None, source=stream
    )
    p_stream.yaxis.visible = False
    p_stream.add_tools(
        HoverTool(tooltips=[("key", "@key"), ("kind", "@kind"), ("worker", "@worker")])
    )

    per_prefix: dict[str, list[float]] = {}  # prefix -> [tasks, erred, seconds]
    for r in computed:
        row = per_prefix.setdefault(r["prefix"], [0, 0, 0.0])
        row[0] += 1
        row[1] += r["kind"] == "erred"
        row[2] += r["stop"] - r["start"]
    names = list(per_prefix)
    progress = ColumnDataSource(
        {
            "y": list(range(len(names))),
            "name": names,
            "tasks": [int(per_prefix[n][0]) for n in names],
            "erred": [int(per_prefix[n][1]) for n in names],
            "seconds": [per_prefix[n][2] for n in names],
            "color": [prefix_color(n) for n in names],
            "label": [
                f"{n}: {int(per_prefix[n][0])} tasks, {per_prefix[n][2]:.2f} s" for n in names
            ],
        },
        name="progress_source",
    )
    p_prog = figure(
        name="task_progress",
        title="Tasks per prefix (compute seconds)",
        height=max(150, 30 * len(names) + 60),
        width=1000,
        tools="",
        toolbar_location=None,
    )
    p_prog.hbar(y="y", left=0, right="seconds", height=0.8, color="color", source=progress)
    p_prog.text(
        x=0, y="y", text="label", text_baseline="middle", text_font_size="11px", source=progress
    )
    p_prog.yaxis.visible = False

    moved = sum(int(r["nbytes"]) for r in transfers)
    summary = Div(
        text=(
            f"<h1>{html.escape(title)}</h1><p>{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(start))}"
            f", {stop - start:.2f} s: <b id='n-tasks'>{len(computed)}</b> tasks "
            f"({sum(1 for r in computed if r['kind'] == 'erred')} erred), "
            f"{sum(r['stop'] - r['start'] for r in computed):.2f} s of compute, "
            f"{len(transfers)} transfers ({html.escape(format_bytes(moved))}).</p>"
        )
    )
    return str(file_html(column(summary, p_prog, p_stream), resources=INLINE, title=title))
