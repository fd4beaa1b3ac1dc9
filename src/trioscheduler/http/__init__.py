"""HTTP served by the scheduler: the web dashboard, ``/health`` and ``/metrics``.

May import: ``wire``, ``core``. The scheduler shell starts it and passes in what it reads;
this package never imports ``server`` (imports for type hints only, under
``TYPE_CHECKING``).
"""
