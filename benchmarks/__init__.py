"""Side-by-side benchmarks of trioscheduler against dask.distributed and raw limits.

Run ``python -m benchmarks [name ...]`` (or ``nox -s bench``); see ``_harness``.
"""
