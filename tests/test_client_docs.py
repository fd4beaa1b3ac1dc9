"""The examples of docs/getting-started.md run as written (each in its own process)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from user_scripts import run_script

DOC = Path(__file__).parent.parent / "docs" / "getting-started.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
# The example that connects to a scheduler started from the command line is left out.
RUNNABLE = [b for b in BLOCKS if "8786" not in b]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(RUNNABLE)))
async def test_getting_started_example_runs(index: int, tmp_path: Path) -> None:
    out = await run_script(tmp_path, f"example_{index}", RUNNABLE[index], seconds=120)
    assert out.strip()


def test_every_example_is_covered() -> None:
    assert len(BLOCKS) == 10 and len(RUNNABLE) == 9
