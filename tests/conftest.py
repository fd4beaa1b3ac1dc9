"""Shared test configuration: hypothesis profiles (fast for CI, long for `nox -s property`)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, settings

# CI is derandomized: the same examples on every run, so a red CI is reproducible and
# never a new random find; `nox -s property` (the "long" profile) is where we explore.
settings.register_profile(
    "ci",
    max_examples=50,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long",
    max_examples=2000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
# `nox -s mutants`: the ci examples without shrinking (a caught mutant needs no minimal case)
settings.register_profile(
    "mutants",
    settings.get_profile("ci"),
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
settings.register_profile("dev", max_examples=20, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``anyio`` run on anyio's backends (trio and asyncio), not pytest-trio's
    trio mode, which marks every ``async def`` test for trio."""
    for item in items:
        if item.get_closest_marker("anyio") is not None:
            item.own_markers[:] = [m for m in item.own_markers if m.name != "trio"]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Tests marked ``anyio`` (the asynchronous client's) run on both of anyio's backends."""
    return str(request.param)
