"""A nursery for context managers whose block's errors must come out unwrapped.

``listen`` and ``open_batched`` own a nursery of background tasks and yield inside it.
A plain ``async with trio.open_nursery()`` around the ``yield`` would wrap the user's
exception in an ``ExceptionGroup``; catching it and re-raising it *after* the nursery
loses it when an enclosing scope was cancelled (the nursery's exit raises ``Cancelled``
first and the enclosing scope absorbs that). ``background_nursery`` keeps the block's
exception and raises it whatever the nursery's exit raised.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


def only_cancelled(exc: BaseException) -> bool:
    """``exc`` is a ``trio.Cancelled``, or a group of nothing else."""
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return False


def sole_error(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member groups, else ``exc`` itself (a
    group of several stays a group: nothing is dropped)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


@asynccontextmanager
async def background_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery for background tasks, cancelled when the block is left.

    An exception raised by the block propagates as it is (no ``ExceptionGroup``), also
    when an enclosing scope was cancelled meanwhile: the cancellation is then not lost,
    it is still in effect and fires at the caller's next checkpoint. A background task
    that fails cancels the block; then its error (in the nursery's group) propagates,
    not the block's ``Cancelled``. If the block failed on its own too, the block's
    error propagates with the background one as its ``__context__``.
    """
    error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                yield nursery
            except BaseException as e:
                error = e
            finally:
                nursery.cancel_scope.cancel()
    except BaseException as exc:
        if error is None:
            raise
        if not only_cancelled(exc):
            if only_cancelled(error):
                raise  # a background task failed and cancelled the block: its error
            raise error  # noqa: B904 (the background failure becomes its __context__)
        # A cancellation from outside: drop it here (it fires again at the next
        # checkpoint) and raise the block's exception below, outside this handler, so
        # that its __context__ stays what it was.
    if error is not None:
        try:
            raise error
        finally:
            del error  # no reference cycle through this frame
