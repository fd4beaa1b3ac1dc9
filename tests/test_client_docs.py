"""The examples of docs/getting-started.md run as written (each in its own process)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import trio

DOC = Path(__file__).parent.parent / "docs" / "getting-started.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
# The example that connects to a scheduler started from the command line is left out.
RUNNABLE = [b for b in BLOCKS if "8786" not in b]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(RUNNABLE)))
async def test_getting_started_example_runs(index: int, tmp_path: Path) -> None:
    script = tmp_path / f"example_{index}.py"
    script.write_text(RUNNABLE[index])
    with trio.fail_after(120):
        result = await trio.run_process(
            [sys.executable, str(script)],
            cwd=tmp_path,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert result.stdout.strip()


def test_every_example_is_covered() -> None:
    assert len(BLOCKS) == 10 and len(RUNNABLE) == 9
