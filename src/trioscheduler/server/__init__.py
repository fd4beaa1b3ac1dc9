"""The I/O shells and what lives in their processes.

``scheduler`` (the scheduler shell around ``core.scheduler``), ``worker`` (around
``core.worker``) with its ``executor`` (task threads), ``task_context`` (what a running
task sees: ``get_worker``, ``secede``), ``memory`` (spill storage) and ``uploads``;
``nanny`` (a worker process's keeper), ``fork`` (starting that process by fork) and
``worker_process`` (what that process runs);
``datasets`` (the scheduler's store of published datasets).

Shells turn bytes into events and instructions into sends; decisions belong in ``core``.
May import: the subsystems a server hosts (``http``, ``kernels``, ``environments``),
``wire``, ``core``. Never ``client``, ``deploy`` or ``cli``.
"""
