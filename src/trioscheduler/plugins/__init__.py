"""Plugins: user code hooked into the scheduler, the workers and the nannies.

``base`` holds the classes a user subclasses (``SchedulerPlugin``, ``WorkerPlugin``,
``NannyPlugin``, with dask's hook names) and ``builtin`` the ready-made ones
(``PipInstall``, ``CondaInstall``, ``InstallPlugin``, ``Environ``, ``UploadFile``,
``UploadDirectory``). Hosting them -- registering by name, calling hooks so that one
that raises harms nobody, installing on workers that join later -- is
``server.plugins``; the client's ``register_plugin`` is ``client.plugins``.

May import: ``server`` (the built-ins use its upload machinery), ``wire``, ``core``.
Never ``deploy``, ``client`` or ``cli``.
"""

from trioscheduler.plugins.base import NannyPlugin, SchedulerPlugin, WorkerPlugin, plugin_name
from trioscheduler.plugins.builtin import (
    CondaInstall,
    Environ,
    InstallPlugin,
    PipInstall,
    UploadDirectory,
    UploadFile,
)

__all__ = [
    "CondaInstall",
    "Environ",
    "InstallPlugin",
    "NannyPlugin",
    "PipInstall",
    "SchedulerPlugin",
    "UploadDirectory",
    "UploadFile",
    "WorkerPlugin",
    "plugin_name",
]
