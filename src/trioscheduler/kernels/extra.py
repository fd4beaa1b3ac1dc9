"""The optional dependency check: one clear error naming the extra to install."""

from __future__ import annotations

import importlib

EXTRA = "trioscheduler[ipython]"
SERVER_MODULES = ("ipykernel", "IPython")  # what a server needs to host a kernel
CLIENT_MODULES = ("jupyter_client", "IPython")  # what talks to one (no ipykernel import)


def require_ipython(
    what: str = "IPython kernels", modules: tuple[str, ...] = SERVER_MODULES
) -> None:
    """Raise ``ImportError`` naming the extra when a module it brings is missing."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ImportError(
                f"{what} need the optional dependencies of {EXTRA} ({name} is missing: "
                f"{exc}); install them with: pip install '{EXTRA}'"
            ) from exc
