"""Keep a kernel's output to its cells: the server's own prints stay on its stdout.

ipykernel replaces ``sys.stdout``/``sys.stderr`` process-wide with streams that ship
to whoever is connected. In a server that would steal the worker's own output (and its
logs' stream handlers) from the nanny or terminal. ``RoutedStream`` sends a write to
the kernel only from code a cell runs, marked by the ``in_kernel_cell`` context
variable (the kernel's thread, and trio tasks an ``await`` cell starts).
"""

from __future__ import annotations

import contextvars
import io
from typing import Any

in_kernel_cell: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "trioscheduler_in_kernel_cell", default=False
)


class RoutedStream(io.TextIOBase):
    """``sys.stdout`` stand-in: the kernel's stream in a cell, the original elsewhere."""

    def __init__(self, kernel_stream: Any, original: Any) -> None:
        self._kernel = kernel_stream
        self.original = original

    def _target(self) -> Any:
        return self._kernel if in_kernel_cell.get() else self.original

    def write(self, s: str) -> int:
        target = self._target()
        if target is None:  # no original stream (pythonw): drop, as print() would
            return len(s)
        n = target.write(s)
        return len(s) if n is None else int(n)

    def flush(self) -> None:
        target = self._target()
        if target is not None:
            target.flush()

    # ipykernel looks these up with hasattr() to label a cell's output; without them
    # the output is silently dropped.
    def set_parent(self, parent: Any) -> None:
        self._kernel.set_parent(parent)

    def __getattr__(self, name: str) -> Any:  # parent_header, set_thread_parent, ...
        return getattr(self._kernel, name)

    def isatty(self) -> bool:
        return bool(self.original is not None and self.original.isatty())

    def fileno(self) -> int:
        if self.original is None:
            raise io.UnsupportedOperation("fileno")
        return int(self.original.fileno())

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self.original, "encoding", None) or "utf-8")
