"""Python environments shipped over the cluster: packing a venv, moving it in chunks,
the per-user content-addressed cache, re-basing it onto a nanny's interpreter.

May import: ``wire``, ``core``. The nanny and scheduler call into it; it never imports
``server`` at run time.
"""
