"""Data flows one way, and the shared formats import no stage: every `import histoserve.<stage>` in
the repository, read from the source with ast, against the allowed graph (README, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

# stage → the stages it may import. formats is the floor: the contract, preprocessing, prediction
# records, drift baseline, repository layout and index rule, admin key, command-line options.
ALLOWED = {
    "formats": set(),
    "client": {"formats"},
    "train": {"formats"},
    "export": {"formats", "train"},   # export reads what train wrote (the checkpoint and its model)
    "serve": {"formats"},
    "monitor": {"formats"},
    "loadtest": {"formats", "client"},  # the load generator drives the client library
}
# what the thin floor may depend on besides the standard library: the base install of pyproject.toml
THIN = {"numpy", "PIL", "pyspng", "simplejpeg", "tritonclient", "google", "grpc"}
# formats modules that need an extra of pyproject.toml, and the stages that install it: model signing
# is shared by export (signs) and serve (verifies, the serve-tools image installs .[signing]).
WITH_EXTRAS = {"signing.py": ({"model_signing", "cryptography"}, {"export", "serve"})}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "histoserve" and len(parts) > 1 else None


def graph_problems(root: Path) -> list[str]:
    problems = []
    for stage, allowed in ALLOWED.items():
        for path in sorted((root / stage).rglob("*.py")):
            for line, module in imported_modules(path):
                target = stage_of(module)
                if target is not None and target != stage and target not in allowed:
                    problems.append(f"{path.relative_to(root)}:{line}: {stage} imports {module}")
    return problems


def test_every_stage_imports_only_what_the_graph_allows():
    assert graph_problems(ROOT) == []


def test_the_shared_formats_stay_thin():
    heavy = [f"{path.relative_to(ROOT)}:{line}: {module}" for path in sorted((ROOT / "formats").rglob("*.py"))
             for line, module in imported_modules(path)
             if module.split(".")[0] not in THIN | WITH_EXTRAS.get(path.name, (set(),))[0]
             and stage_of(module) is None and not is_standard_library(module)]
    assert heavy == []


def test_a_formats_module_with_an_extra_is_imported_only_by_the_stages_that_install_it():
    users = {(stage, f"{path.relative_to(ROOT)}:{line}") for stage in ALLOWED for path in sorted((ROOT / stage).rglob("*.py"))
             for line, module in imported_modules(path) for name, (_, stages) in WITH_EXTRAS.items()
             if module == f"histoserve.formats.{name.removesuffix('.py')}" and stage not in stages | {"formats"}}
    assert users == set()


def is_standard_library(module: str) -> bool:
    import sys

    return module.split(".")[0] in sys.stdlib_module_names or module == "__future__"


@pytest.mark.parametrize("source, importer", [
    ("from histoserve.monitor.service import Monitor\n", "client"),   # the client reaching into a stage for a type
    ("import histoserve.export.repository\n", "serve"),
    ("from histoserve.client.classifier import TritonClassifier\n", "formats"),
])
def test_the_check_fails_on_a_forbidden_import(tmp_path, source, importer):
    for stage in ALLOWED:
        (tmp_path / stage).mkdir()
    (tmp_path / importer / "bad.py").write_text(source)
    [problem] = graph_problems(tmp_path)
    assert problem.startswith(f"{importer}/bad.py:1: {importer} imports histoserve.")
