"""Developer sessions: `nox -s tests`, `nox -s property`, `nox -s mutants`, `nox -s lint`,
`nox -s bench`."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "venv"

# The reference we measure against; installed in the bench session only.
DASK_PIN = ["dask[array,dataframe,bag]==2026.8.0", "distributed==2026.8.0"]


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite, with the fast hypothesis profile, against the package as
    users install it (not editable: the core compiled by mypyc where possible)."""
    session.install(".[test]")
    session.run("python", "-c", "import trioscheduler.core as c; print('compiled core:', c.compiled())")
    session.run(
        "pytest", "-x", "-q", "--hypothesis-profile=ci", *session.posargs,
        env={"PYTHONFAULTHANDLER": "1"},
    )


@nox.session
def property(session: nox.Session) -> None:
    """The hypothesis state machines and fuzzers with the long profile."""
    session.install(".[test]")
    session.run("pytest", "-q", "tests/property", "--hypothesis-profile=long", *session.posargs)


@nox.session
def mutants(session: nox.Session) -> None:
    """Known-bad edits of the core: which does the cluster machine (ci examples) catch?"""
    session.install("-e", ".[test]")
    session.run("python", "tests/property/mutants.py", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("-e", ".[test]", "ruff", "mypy", "types-psutil")
    session.run("ruff", "check", "src", "tests", "benchmarks")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """Side-by-side benchmarks against a pinned dask.distributed; prints ratios."""
    session.install(".[bench]", *DASK_PIN)  # as users install it: compiled core
    session.run("python", "-m", "benchmarks", *session.posargs)
