"""Run a user's script as its own Python process, as a user would, for the tests that
check what such a script prints (the docs' examples, a dask script with only the import
changed, functions defined in ``__main__``)."""

from __future__ import annotations

import sys
from pathlib import Path

import trio


async def run_script(tmp_path: Path, name: str, text: str, seconds: float = 180) -> str:
    """Write ``text`` to ``tmp_path/name.py``, run it there; its stdout (it must exit 0)."""
    script = tmp_path / f"{name}.py"
    script.write_text(text)
    with trio.fail_after(seconds):
        result = await trio.run_process(
            [sys.executable, str(script)],
            cwd=tmp_path,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    return result.stdout.decode()
