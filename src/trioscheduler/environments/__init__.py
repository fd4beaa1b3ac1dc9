"""Python environments that users ship to the cluster, and workers restarted inside them.

This subpackage owns the whole path of an environment: packing a venv (or a conda-pack
style prefix) into a tar.gz archive with a manifest (``archive``), the facts that decide
whether a host can run it (``manifest``), the scheduler's store of uploaded archives and
its *current* environment (``store``), the chunked, sha256-checked transfer over the
cluster's own connections (``transfer``), the per-user host cache that extracts an
archive safely, re-bases a venv onto the nanny's interpreter and renames it into place
atomically (``cache``, ``extract``, ``rebase``), the preflight and command line of a
worker inside an environment (``launch``), a nanny's view of all this (``keeper``) and
the first phase of a two-phase restart (``twophase``).

It sits below the server shells: the scheduler and the nanny import it and hand it the
connections it needs. May import: ``wire``, ``core``; never ``server`` at run time.
"""

from __future__ import annotations

from trioscheduler.environments.errors import (
    EnvironmentRefusedError,
    IncompatibleEnvironmentError,
    UnsafeArchiveError,
)

__all__ = ["EnvironmentRefusedError", "IncompatibleEnvironmentError", "UnsafeArchiveError"]
