"""The mutants of ``mutants.py`` still apply: each edit matches its file exactly once.

A refactor of the core that moves or rewrites a mutated line leaves its mutant stale (it
then reports "stale" instead of being run, and the core goes untested against it): this
fails first, naming the mutant to update.
"""

from __future__ import annotations

import pytest
from mutants import MUTANTS, Mutant, stale


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_applies(mutant: Mutant) -> None:
    assert stale(mutant) == ""
