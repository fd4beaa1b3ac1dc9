"""The sans-io core: pure state machines for the scheduler and the worker.

Nothing under this package imports trio, sockets, threads, clocks or randomness; time
arrives as the ``now`` field of events. The shells feed events to ``handle`` and carry
out the effects/instructions it returns.

May import: ``errors`` only (and the standard library's pure parts).
"""

from importlib.util import find_spec


def compiled() -> bool:
    """Whether the state machines run compiled by mypyc (see ``setup.py``): benchmarks
    say which build they measured."""
    spec = find_spec("trioscheduler.core.scheduler")
    return spec is not None and spec.origin is not None and not spec.origin.endswith(".py")
