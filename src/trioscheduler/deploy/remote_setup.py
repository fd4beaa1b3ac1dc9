"""What ``SSHCluster`` hands each process it starts, besides its options: the cluster's
TLS certificates and the client's dask config, as one line of JSON on the process's stdin.

Why stdin: the line travels inside the SSH connection, encrypted, and never appears on
a command line (``ps`` shows every user's argv) or in the environment
(``/proc/PID/environ``). The remote scheduler and workers keep the certificates in
memory; a nanny hands its worker processes 0600 files in its own 0700 scratch directory,
removed when it closes (``server/nanny.py``). Certificate fields given as paths are read
here, on the client, and shipped as their PEM text: the hosts need no copy of them.

The config is dask's (``dask.config.config``, as dask's ``SSHCluster`` forwards it in
``DASK_INTERNAL_INHERIT_CONFIG``): the remote process merges it over its own (the
client's values win, as there) and puts it in ``DASK_INTERNAL_INHERIT_CONFIG`` for its
own children, so a worker a nanny spawns sees it too. Values JSON cannot carry (a
Client's own ``scheduler`` callable) stay behind; any but that one is named in a warning.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from trioscheduler.wire.security import Security

logger = logging.getLogger("trioscheduler.ssh")

_CLIENT_LOCAL = frozenset({"scheduler", "get"})
"""Config keys a Client sets for its own process (``dask.config.set(scheduler=...)``)."""

_PEM_FIELDS = (
    "tls_ca_file",
    "tls_client_cert", "tls_client_key",
    "tls_scheduler_cert", "tls_scheduler_key",
    "tls_worker_cert", "tls_worker_key",
)  # fmt: skip


def pack(security: Security | None, config: dict[str, Any]) -> str:
    """The setup line (without its newline) for one remote process."""
    shipped: dict[str, Any] | None = None
    if security is not None:
        shipped = security.to_dict()
        for field in _PEM_FIELDS:
            value = shipped.get(field)
            if value and "\n" not in value:  # a path here: its contents go
                try:
                    with open(value) as f:
                        shipped[field] = f.read()
                except OSError as exc:
                    raise ValueError(f"SSHCluster: cannot read {field}={value!r}: {exc}") from exc
    return json.dumps({"security": shipped, "config": portable_config(config)})


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without what JSON cannot carry (named in a warning, unless client-local)."""
    dropped: list[str] = []

    def keep(mapping: dict[str, Any], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in mapping.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                out[key] = keep(value, f"{name}.")
                continue
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                if name not in _CLIENT_LOCAL:
                    dropped.append(name)
                continue
            out[key] = value
        return out

    kept = keep(config, "")
    if dropped:
        logger.warning(
            "SSHCluster: dask config not forwarded to the hosts (not JSON): %s",
            ", ".join(sorted(dropped)),
        )
    return kept


def unpack(line: str) -> Security | None:
    """Apply a setup line in the remote process: the config now (and for its children);
    the certificates as the ``Security`` its scheduler or workers use (None: plain tcp)."""
    setup = json.loads(line)
    if not isinstance(setup, dict):
        raise ValueError("the setup line must be a JSON object")
    config = setup.get("config") or {}
    if config:
        import dask.config

        dask.config.update(dask.config.config, config, priority="new")
        os.environ["DASK_INTERNAL_INHERIT_CONFIG"] = dask.config.serialize(config)
    fields = setup.get("security")
    return None if fields is None else Security(**fields)


def read_line(fd: int) -> str:
    """One line from ``fd`` (blocking; before the process's trio loop starts). The SSH
    client writes nothing after it until EOF, so nothing is read past the newline."""
    chunks: list[bytes] = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            break
    data = b"".join(chunks)
    if not data.endswith(b"\n"):
        raise ValueError("stdin ended before the setup line (the SSH client is gone)")
    return data.decode()
