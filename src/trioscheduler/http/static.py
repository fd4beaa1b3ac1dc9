"""BokehJS, served from the installed ``bokeh`` package (never a CDN).

Only the bundles in ``BUNDLES`` (bare names in bokeh's ``server/static/js``) are served:
no ``/`` or ``..`` can name another file. Each file is read, gzipped and hashed once (in a
worker thread: the first read of bokeh.min.js is ~1.3 MB), then kept; the pages name
it with ``?v=<hash>`` and it is sent ``immutable``, so a browser loads it once per
bokeh version. The JS version therefore always equals the Python ``bokeh``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import threading

__all__ = ["BUNDLES", "BokehStatic"]

BUNDLES = frozenset(
    {"bokeh.min.js", "bokeh-widgets.min.js", "bokeh-tables.min.js", "bokeh-gl.min.js"}
)
"""The only files served: what the pages can use (never mathjax, 1.8 MB)."""


class BokehStatic:
    def __init__(self) -> None:
        self._files: dict[str, tuple[bytes, bytes, str]] = {}
        self._lock = threading.Lock()
        self._dir: str | None = None

    def directory(self) -> str:
        if self._dir is None:
            from bokeh.util.paths import bokehjs_path

            self._dir = os.path.join(str(bokehjs_path()), "js")
        return self._dir

    def get(self, name: str) -> tuple[bytes, bytes, str] | None:
        """``(raw, gzipped, version)`` of a served file, or None: blocking, call in a thread."""
        if name not in BUNDLES:
            return None
        with self._lock:
            cached = self._files.get(name)
            if cached is not None:
                return cached
            path = os.path.join(self.directory(), name)
            if not os.path.isfile(path):
                return None
            with open(path, "rb") as f:
                raw = f.read()
            entry = (raw, gzip.compress(raw, 6), hashlib.sha256(raw).hexdigest()[:16])
            self._files[name] = entry
            return entry

    def cached(self, name: str) -> tuple[bytes, bytes, str] | None:
        return self._files.get(name)
