"""The wire: streams between scheduler, workers and clients.

``connect``/``listen`` give ``Stream``s over ``tcp://``, ``tls://`` or ``inproc://`` with the
shape of a trio memory channel pair; ``open_batched`` coalesces small messages;
``ConnectionPool`` reuses short-lived connections. Serialization lives in
``trioscheduler.wire.serialize``; ``remote_error`` packs exceptions with their
tracebacks, ``runspec`` the function-and-arguments of a task, both shared by client
and worker; ``local_alias`` finds a listener served by the current trio run;
``security`` (``Security``, TLS contexts) and ``tls`` decide who may connect;
``shm`` hands large buffers to processes on the same host through ``memfd`` segments;
``unix_route`` carries plain ``tcp://`` connections within one network namespace over
a Unix socket (the same-host shortcut); ``busy_poll`` lets the loops of the processes
this package starts poll their I/O a little before sleeping;
``background_nursery`` is the nursery every shell's ``async with`` yields inside.

May import: ``core`` (message types) and ``errors``; nothing above.
"""

from __future__ import annotations

from trioscheduler.wire._nursery import background_nursery, only_cancelled, sole_error
from trioscheduler.wire.address import AddressError, parse_address
from trioscheduler.wire.batched import BatchedSend, DirectSend, open_batched
from trioscheduler.wire.endpoints import Listener, connect, listen
from trioscheduler.wire.handshake import PROTOCOL_VERSION
from trioscheduler.wire.pool import ConnectionPool
from trioscheduler.wire.security import Security, SecurityError
from trioscheduler.wire.serialize import DeserializationError, SerializationError
from trioscheduler.wire.stream import (
    ConnectError,
    ProtocolError,
    ProtocolVersionError,
    Stream,
)

__all__ = [
    "PROTOCOL_VERSION",
    "AddressError",
    "BatchedSend",
    "ConnectError",
    "ConnectionPool",
    "DeserializationError",
    "DirectSend",
    "Listener",
    "ProtocolError",
    "ProtocolVersionError",
    "Security",
    "SecurityError",
    "SerializationError",
    "Stream",
    "background_nursery",
    "only_cancelled",
    "sole_error",
    "connect",
    "listen",
    "open_batched",
    "parse_address",
]
