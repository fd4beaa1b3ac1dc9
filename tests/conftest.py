"""Shared test configuration: hypothesis profiles (fast for CI, long for `nox -s property`)."""

from __future__ import annotations

import os

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
