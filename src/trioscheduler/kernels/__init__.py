"""IPython kernels inside the scheduler and worker processes, and the client-side magics
(``%scheduler``, ``%remote``) that talk to them.

Owns everything about a live kernel in a server process: starting ipykernel in a thread
beside the server's ``trio.run`` without letting it kill, rewire or slow the server
(``thread``, ``routing``), one kernel per process shared by every server in it
(``service``), and the user's side that talks to such kernels through ``jupyter_client``
(``magics``). Optional: ``trioscheduler[ipython]`` (``extra``).

May import: ``wire``, ``core``. The server shells start kernels and pass themselves in;
this package never imports ``server`` at run time.
"""

from __future__ import annotations

from trioscheduler.kernels.extra import EXTRA, require_ipython

__all__ = ["EXTRA", "require_ipython"]
