"""IPython kernels inside the scheduler and worker processes, and the client-side magics
(``%scheduler``, ``%remote``) that talk to them.

May import: ``wire``, ``core``. The server shells start kernels and pass themselves in;
this package never imports ``server`` at run time.
"""
