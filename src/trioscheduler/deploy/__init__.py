"""Starting clusters: ``LocalCluster`` (scheduler, nannies or workers in this process's
trio run), and ``loop``, the background trio loop thread the sync facades
(``LocalCluster``, ``Client``) run on. Later: SSH deployment.

May import: ``server``, the subsystems, ``wire``, ``core``. Never ``client`` or ``cli``.
"""
