"""Starting clusters: ``LocalCluster`` (scheduler, nannies or workers in this process's
trio run), ``SSHCluster`` (a scheduler and workers on other hosts over SSH, with
``spawn``, the process it runs there), and ``loop``, the background trio loop thread
the sync facades (``LocalCluster``, ``SSHCluster``, ``Client``) run on.

May import: ``server``, the subsystems, ``wire``, ``core``. Never ``client`` or ``cli``.
"""
