"""No function over 60 lines outside tests: a longer one does several things, and each deserves a name."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

MAX_LINES = 60
SKIPPED = {"tests", ".venv", ".venv-checkov", "node_modules", "site", "build"}


def long_functions(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        if SKIPPED & set(path.relative_to(root).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {lines} lines")
    return found


def test_no_function_is_over_60_lines():
    assert long_functions(ROOT) == []


def test_a_long_function_is_found(tmp_path):
    def function(lines: int) -> str:  # `lines` lines long, inside a class
        return "class A:\n    def f(self):\n" + "".join(f"        x{i} = {i}\n" for i in range(lines - 1))

    for folder in ("stage", "tests"):
        (tmp_path / folder).mkdir()
    (tmp_path / "stage" / "ok.py").write_text(function(MAX_LINES))
    (tmp_path / "tests" / "test_long.py").write_text(function(MAX_LINES + 20))
    assert long_functions(tmp_path) == []
    (tmp_path / "stage" / "long.py").write_text(function(MAX_LINES + 1))
    assert long_functions(tmp_path) == [f"stage/long.py:2 f: {MAX_LINES + 1} lines"]
