"""One object, two modes: the sync/async shape every cluster shares (dask's).

A cluster made with ``asynchronous=False`` holds its trio life (``_open()``, an async
context manager) open in the process-wide background loop and is used with ``with`` or
``close()``; one made with ``asynchronous=True`` is entered with ``async with`` in the
caller's own trio task tree. Subclasses write ``_open()`` and set ``_handle`` (the
background loop's ``enter`` of it) when sync; the rest is here.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Self

__all__ = ["SyncAsyncFacade"]


class SyncAsyncFacade:
    asynchronous: bool
    _handle: Any  # deploy.loop's Entered, while a sync cluster is open
    _life: AbstractAsyncContextManager[Any] | None  # _open(), while an async one is open
    _open: Callable[[], AbstractAsyncContextManager[Any]]  # the subclass's life

    # -- sync use ------------------------------------------------------------------

    def __enter__(self) -> Self:
        if self.asynchronous:
            raise TypeError(f"an asynchronous {type(self).__name__} is used with 'async with'")
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> Any:
        """Stop the workers, then the scheduler; idempotent.

        Returns an awaitable when the cluster is asynchronous.
        """
        if self.asynchronous:
            return self._aclose()
        if self._handle is not None:
            handle, self._handle = self._handle, None
            handle.close()
        return None

    async def _aclose(self) -> None:
        if self._life is not None:
            life, self._life = self._life, None
            await life.__aexit__(None, None, None)

    # -- async use -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if not self.asynchronous:
            raise TypeError(f"'async with' needs {type(self).__name__}(..., asynchronous=True)")
        # A start-up failure inside _open() has already unwound what it opened.
        life = self._open()
        await life.__aenter__()
        self._life = life
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        life, self._life = self._life, None
        if life is None:
            return None
        result: bool | None = await life.__aexit__(*exc_info)
        return result
