"""Plain HTML pages under ``/info``: the scheduler, each worker, their logs.

No Bokeh and no script: a table per page from the shared snapshot, linked to each
other, readable by anything that reads HTML. Values are escaped; a worker's page is
found by its address (percent-encoded in the URL).
"""

from __future__ import annotations

import html
from urllib.parse import quote

from trioscheduler.http.pages import page_head, page_tail
from trioscheduler.http.snapshot import Snapshot, format_bytes

__all__ = ["logs_page", "worker_page", "workers_page"]


def worker_href(address: str) -> str:
    return "/info/worker/" + quote(address, safe="") + ".html"


def logs_href(address: str) -> str:
    return "/info/logs/" + quote(address, safe="") + ".html"


def _e(value: object) -> str:
    return html.escape(str(value))


def workers_page(snap: Snapshot) -> str:
    c = snap.counts
    rows = []
    for w in snap.workers:
        limit = w["memory_limit"]
        use = f"{100 * w['memory'] / limit:.0f}%" if limit else ""
        rows.append(
            "<tr>"
            f'<td><a href="{worker_href(w["address"])}">{_e(w["address"])}</a></td>'
            f"<td>{_e(w['name'])}</td><td>{w['nthreads']}</td>"
            f"<td>{_e(w['memory_text'])}</td><td>{_e(w['limit_text'])}</td><td>{use}</td>"
            f"<td>{_e(w['managed_text'])}</td><td>{_e(w['spilled_text'])}</td>"
            f"<td>{w['processing']}</td><td>{w['executing']}</td><td>{w['in_memory']}</td>"
            f"<td>{_e(w['status'])}</td><td>{w['last_seen']:.1f} s ago</td>"
            f'<td><a href="{logs_href(w["address"])}">logs</a></td></tr>'
        )
    return (
        page_head("Scheduler", "/info/main/workers.html")
        + f"<h1>Scheduler {_e(snap.identity['address'])}</h1>"
        + f"<p>{c['workers']} workers, {c['cores']} threads, {c['tasks']} tasks "
        f"({c['memory']} in memory, {c['processing']} processing, {c['erred']} erred), "
        f"{_e(format_bytes(c['bytes']))} stored, {c['clients']} clients.</p>"
        + '<table class="info" id="workers-table"><thead><tr><th>Worker</th><th>Name</th>'
        "<th>Threads</th><th>Memory</th><th>Limit</th><th>Use</th><th>Managed</th>"
        "<th>Spilled</th><th>Processing</th><th>Executing</th><th>In memory</th>"
        "<th>Status</th><th>Last seen</th><th>Logs</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
        + page_tail()
    )


def worker_page(snap: Snapshot, address: str, processing: list[str]) -> str | None:
    """A worker's page, or None if no such worker is connected."""
    row = next((w for w in snap.workers if w["address"] == address), None)
    if row is None:
        return None
    cells = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in row.items())
    tasks = "".join(f"<li>{_e(k)}</li>" for k in processing[:100])
    more = f"<p>and {len(processing) - 100} more</p>" if len(processing) > 100 else ""
    return (
        page_head(f"Worker {address}", "")
        + f"<h1>Worker {_e(address)}</h1>"
        + f'<p><a href="/info/main/workers.html">all workers</a> &middot; '
        f'<a href="{logs_href(address)}">logs</a></p>'
        + f'<table class="info" id="worker-info">{cells}</table>'
        + f"<h2>Processing ({len(processing)})</h2><ul>{tasks}</ul>{more}"
        + page_tail()
    )


def logs_page(lines: list[str], whose: str = "Scheduler") -> str:
    body = "\n".join(_e(line) for line in lines) or "(nothing logged yet)"
    here = "/info/main/logs.html" if whose == "Scheduler" else ""
    return (
        page_head(f"{whose} logs", here)
        + f"<h1>{_e(whose)} logs</h1>"
        + f'<pre class="logs" id="logs">{body}</pre>'
        + page_tail()
    )
