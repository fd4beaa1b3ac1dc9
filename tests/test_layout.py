"""The folders are the architecture: imports run one way, downward (issue 11).

Every ``import`` in the package is read with ``ast`` (function-level ones included; those
under ``if TYPE_CHECKING:`` are exempt, they never run) and each must point to the
module's own folder or a folder below it::

    cli -> client -> deploy -> plugins -> server -> {http, kernels, environments} -> wire -> core -> base

``base`` is ``errors`` and ``_version``; the package face (``__init__``, ``__main__``,
``_legacy``) sits on top. With one direction there can be no circle between folders.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "trioscheduler"

RANK = {
    "base": 0,
    "core": 1,
    "wire": 2,
    "http": 3,
    "kernels": 3,
    "environments": 3,
    "server": 4,
    "plugins": 5,
    "deploy": 6,
    "client": 7,
    "cli": 8,
    "face": 9,
}
BASE = {"errors", "_version"}
FACE = {"__init__", "__main__", "_legacy"}


def _layer(dotted: str) -> str:
    """The layer of module ``trioscheduler.<...>`` (``dotted`` without the prefix)."""
    head = dotted.split(".", 1)[0]
    if head in RANK:
        return head
    if head in BASE:
        return "base"
    if head in FACE or head == "":
        return "face"
    raise AssertionError(f"trioscheduler.{dotted} belongs to no layer: add its folder to RANK")


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, dotted name without 'trioscheduler.')`` of every run-time import."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(
                (node.lineno, a.name.removeprefix("trioscheduler").lstrip("."))
                for a in node.names
                if a.name == "trioscheduler" or a.name.startswith("trioscheduler.")
            )
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mod = node.module
            if mod == "trioscheduler" or mod.startswith("trioscheduler."):
                base = mod.removeprefix("trioscheduler").lstrip(".")
                for a in node.names:  # ``from trioscheduler.x import y``: y may be a module
                    sub = f"{base}.{a.name}" if base else a.name
                    target = PACKAGE.joinpath(*sub.split("."))
                    if target.is_dir() or target.with_suffix(".py").exists():
                        found.append((node.lineno, sub))
                    else:
                        found.append((node.lineno, base))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "egg-info" not in str(p))


def _dotted(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(rel.parts)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_downward(path: Path) -> None:
    here = _layer(_dotted(path))
    bad = []
    for line, target in _imports(ast.parse(path.read_text(), str(path))):
        there = _layer(target)
        if there == here:
            continue
        if RANK[there] >= RANK[here]:
            bad.append(f"line {line}: {here} imports trioscheduler.{target} ({there})")
    assert not bad, f"{path.relative_to(PACKAGE)} imports upward or sideways:\n" + "\n".join(bad)


def test_every_folder_says_what_it_owns_and_may_import() -> None:
    for folder in RANK:
        init = PACKAGE / folder / "__init__.py"
        if folder in ("base", "face"):
            continue
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{folder}/__init__.py has no docstring"
        assert "may import" in doc.lower(), f"{folder}/__init__.py does not say what it may import"


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: a server module importing the client is reported."""
    code = "def f():\n    from trioscheduler.client.client import Client\n"
    imports = _imports(ast.parse(code))
    assert imports == [(2, "client.client")]
    assert RANK[_layer("client.client")] > RANK[_layer("server.worker")]
    typed = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import trioscheduler.client\n"
    assert _imports(ast.parse(typed)) == []
