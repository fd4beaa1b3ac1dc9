"""The sans-io core: pure state machines for the scheduler and the worker.

Nothing under this package imports trio, sockets, threads, clocks or randomness; time
arrives as the ``now`` field of events. The shells feed events to ``handle`` and carry
out the effects/instructions it returns.
"""
