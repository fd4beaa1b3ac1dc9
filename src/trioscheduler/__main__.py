"""``python -m trioscheduler``: the same as the ``trioscheduler`` command."""

from trioscheduler.cli import main

raise SystemExit(main())
