"""The compatibility table in docs/dask-compatibility.md cannot drift from the code.

The installed ``distributed`` (pinned in the ``test`` extra, used here only for
introspection) is the reference: each public name of its ``Client``, ``Future`` and
``__all__`` is present in trioscheduler, or listed in the table as absent with a reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import trioscheduler

distributed = pytest.importorskip("distributed")

DOC = Path(__file__).resolve().parents[1] / "docs" / "dask-compatibility.md"
ROW = re.compile(r"^\| `([^`]+)` \| (present|different|absent) \|(.*)\|\s*$")


def table(heading: str) -> dict[str, tuple[str, str]]:
    """``{name: (status, notes)}`` of the table under ``## heading``."""
    text = DOC.read_text()
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    rows: dict[str, tuple[str, str]] = {}
    for line in text[start : end if end != -1 else None].splitlines():
        match = ROW.match(line)
        if match:
            rows[match.group(1)] = (match.group(2), match.group(3).strip())
    return rows


def public(obj: object) -> set[str]:
    return {n for n in dir(obj) if not n.startswith("_")}


CASES = [
    ("Client", lambda: public(distributed.Client), lambda: public(trioscheduler.Client)),
    ("Future", lambda: public(distributed.Future), lambda: public(trioscheduler.Future)),
    (
        "Package names (`distributed.__all__`)",
        lambda: set(distributed.__all__),
        lambda: set(dir(trioscheduler)),
    ),
]


@pytest.mark.parametrize(("heading", "theirs", "ours"), CASES, ids=["Client", "Future", "all"])
def test_every_dask_name_is_present_or_listed_with_a_reason(
    heading: str, theirs: object, ours: object
) -> None:
    rows = table(heading)
    dask_names: set[str] = theirs()  # type: ignore[operator]
    our_names: set[str] = ours()  # type: ignore[operator]
    unlisted = sorted(dask_names - set(rows))
    assert not unlisted, f"names of dask's {heading} missing from {DOC.name}: {unlisted}"
    missing = sorted(n for n in dask_names - our_names if rows[n][0] != "absent" or not rows[n][1])
    assert not missing, f"neither present nor listed as absent with a reason: {missing}"
    claimed = sorted(
        n for n, (status, _) in rows.items() if status != "absent" and n not in our_names
    )
    assert not claimed, f"listed as present but missing: {claimed}"
    stale = sorted(set(rows) - dask_names)
    assert not stale, f"listed but not in dask's {heading}: {stale}"


def test_client_has_at_least_60_of_dasks_64_names() -> None:
    dask_names = public(distributed.Client)
    present = dask_names & public(trioscheduler.Client)
    assert len(dask_names) == 64
    assert len(present) >= 60, sorted(dask_names - present)
