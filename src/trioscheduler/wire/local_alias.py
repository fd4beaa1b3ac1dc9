"""A TCP listener's in-process twin, for peers in the same trio run.

A scheduler served by the same trio run as its client (a ``LocalCluster`` beside a sync
``Client`` share the process-wide loop) is reached through an ``inproc://`` alias:
messages go by reference, with no sockets, encoding or wake-ups of the kernel on the
way. The server registers the alias here; ``local_route`` is how a connector finds it,
so the client needs nothing of the server but the address.
"""

from __future__ import annotations

import trio

__all__ = ["local_route", "register", "unregister"]

_LOCAL: dict[str, tuple[str, trio.lowlevel.TrioToken]] = {}
"""Listeners of this process: public address -> (inproc alias, the run serving it)."""


def register(address: str, alias: str) -> None:
    """``alias`` (``inproc://``) serves ``address`` for connectors in the current run."""
    _LOCAL[address] = (alias, trio.lowlevel.current_trio_token())


def unregister(address: str) -> None:
    _LOCAL.pop(address, None)


def local_route(address: str) -> str:
    """The address to connect to for ``address`` from the current trio run: its alias
    if the current run serves it, else ``address`` itself."""
    entry = _LOCAL.get(address)
    if entry is None:
        return address
    alias, token = entry
    try:
        here = trio.lowlevel.current_trio_token()
    except RuntimeError:
        return address
    return alias if here is token else address
