"""``python -m trioscheduler``: the same as the ``trioscheduler`` command."""

import gc

from trioscheduler.cli.main import main

status = main()
# The process ends here: with every object frozen, the collections at interpreter exit
# have nothing to walk, which takes tens of milliseconds off a spawned worker's shutdown.
gc.freeze()
raise SystemExit(status)
