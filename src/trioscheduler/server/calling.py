"""Calling a user's function on a server (``run``, ``run_on_scheduler``, plugins).

dask passes the server itself to a function that asks for it by keyword
(``dask_worker=``, ``dask_scheduler=``) and awaits what a coroutine function returns; the
scheduler and the worker do it the same way, here.
"""

from __future__ import annotations

import inspect
from typing import Any

import cloudpickle

__all__ = ["accepts_keyword", "call_pickled"]


def accepts_keyword(fn: Any, name: str) -> bool:
    """Does ``fn`` take a keyword argument ``name``? (False when it has no signature.)"""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


async def call_pickled(payload: bytes, keyword: str, server: Any) -> Any:
    """Call the ``(fn, args, kwargs)`` a trusted peer pickled, ``server`` as ``keyword``
    if ``fn`` takes it; a coroutine's result is awaited. Errors propagate to the caller,
    which packs them for the wire."""
    fn, args, kwargs = cloudpickle.loads(payload)
    if accepts_keyword(fn, keyword):
        kwargs = {**kwargs, keyword: server}
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result
