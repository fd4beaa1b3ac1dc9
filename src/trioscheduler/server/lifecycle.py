"""``async with`` around a server's ``_run()``: the shape the worker and nanny share.

``_run()`` is an async context manager that opens everything the server needs and, on a
start-up failure, has already unwound what it opened; ``__aenter__`` holds it open and
``__aexit__`` leaves it with the block's outcome.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Self

__all__ = ["RunsInAsyncWith"]


class RunsInAsyncWith:
    _life: AbstractAsyncContextManager[Any] | None  # _run(), while open
    _run: Callable[[], AbstractAsyncContextManager[Any]]

    async def __aenter__(self) -> Self:
        life = self._run()
        await life.__aenter__()
        self._life = life
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        assert self._life is not None
        result: bool | None = await self._life.__aexit__(*exc_info)
        return result
