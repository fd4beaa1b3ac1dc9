"""``--preload``: user code a server runs as it starts and closes (dask's preload API).

A preload is a module name (``mypackage.setup``) or the path of a ``.py`` file. Its
``dask_setup(server)`` runs once the server listens (the ``Worker``, ``Nanny`` or
``Scheduler`` is passed in, as in dask) and ``dask_teardown(server)`` when it closes,
in reverse order; either may be a coroutine function, awaited on the server's trio
loop. A preload that cannot be found, or whose setup raises, stops the server from
starting with an error naming the preload: a half-configured worker is worse than none.
(dask's click-command form of ``dask_setup`` with its own options is not supported.)
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import os
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from types import ModuleType
from typing import Any

from trioscheduler.errors import TrioSchedulerError

__all__ = ["PreloadError", "load", "preloads"]

logger = logging.getLogger("trioscheduler.preload")


class PreloadError(TrioSchedulerError):
    """A ``--preload`` could not be imported, or its ``dask_setup`` failed."""


def load(spec: str) -> ModuleType:
    """The module ``spec`` names: a ``.py`` path (loaded under a name of its own) or an
    importable module name."""
    if spec.endswith(".py") or os.sep in spec:
        path = os.path.abspath(spec)
        if not os.path.isfile(path):
            raise PreloadError(f"preload {spec!r}: no such file")
        name = "trioscheduler_preload_" + hashlib.sha1(path.encode()).hexdigest()[:12]
        module = sys.modules.get(name)
        if module is not None:
            return module
        file_spec = importlib.util.spec_from_file_location(name, path)
        assert file_spec is not None and file_spec.loader is not None
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[name] = module
        try:
            file_spec.loader.exec_module(module)
        except BaseException as exc:
            del sys.modules[name]
            raise PreloadError(f"preload {spec!r} failed to load: {exc!r}") from exc
        return module
    try:
        return importlib.import_module(spec)
    except ImportError as exc:
        raise PreloadError(
            f"preload {spec!r}: not a .py file and not an importable module ({exc})"
        ) from exc


async def _call(module: ModuleType, hook: str, server: Any) -> None:
    fn = getattr(module, hook, None)
    if fn is None:
        return
    result = fn(server)
    if inspect.isawaitable(result):
        await result


@asynccontextmanager
async def preloads(specs: Sequence[str], server: Any) -> AsyncIterator[None]:
    """Run each preload's ``dask_setup(server)``; ``dask_teardown`` on the way out."""
    modules = [load(spec) for spec in specs]
    started: list[ModuleType] = []
    try:
        for spec, module in zip(specs, modules, strict=True):
            try:
                await _call(module, "dask_setup", server)
            except Exception as exc:
                raise PreloadError(f"preload {spec!r}: dask_setup failed: {exc!r}") from exc
            started.append(module)
        yield
    finally:
        for module in reversed(started):
            try:
                await _call(module, "dask_teardown", server)
            except Exception:
                logger.exception(
                    "preload %s: dask_teardown failed", module.__name__
                )
