"""Data flows one way, and the shared formats import no stage: every `import histoserve.<stage>` in
the repository, read from the source with ast, against the allowed graph (docs/index.md, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.stages import PACKAGES

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


# top-level folders with Python files that are not stages: they may import any stage
OUTSIDE = {"tests", "benchmarks", "scripts", "docs"}


def imported_modules(path: Path, root: Path | None = None) -> list[tuple[int, str]]:
    """Every module a file imports, as an installed name: a relative import resolved against the file's
    package (histoserve.<stage>... when `root` is the repository), `from histoserve import client` as
    histoserve.client."""
    tree = ast.parse(path.read_text(), str(path))
    package = ["histoserve", *path.parent.relative_to(root).parts] if root else []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] if root and node.level <= len(package) else ["<above the root>"]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module
            if module == "histoserve":  # from histoserve import client: the stage is the name imported
                found += [(node.lineno, f"histoserve.{alias.name}") for alias in node.names]
            elif not node.module and node.level:  # from . import x, from .. import y: each a module of that package
                found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, module))
    return found


def python_files(root: Path) -> list[str]:
    """The repository's Python files (git's list: not the virtualenvs or generated model folders); every
    one for a folder that is no checkout (the self-tests')."""
    if (root / ".git").exists():
        import subprocess

        return subprocess.run(["git", "-C", str(root), "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
                              capture_output=True, text=True, check=True).stdout.split()
    return [p.relative_to(root).as_posix() for p in root.rglob("*.py")]


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "histoserve" and len(parts) > 1 else None


def graph_problems(root: Path) -> list[str]:
    problems = []
    folders = sorted({Path(name).parts[0] for name in python_files(root) if len(Path(name).parts) > 1} - OUTSIDE)
    problems += [f"{folder}/: Python files in a folder that is neither a stage (ALLOWED) nor outside the package (OUTSIDE)"
                 for folder in folders if folder not in ALLOWED]
    for stage, allowed in ALLOWED.items():
        for path in sorted((root / stage).rglob("*.py")):
            for line, module in imported_modules(path, root):
                where = f"{path.relative_to(root)}:{line}"
                if module.split(".")[0] in ALLOWED:
                    problems.append(f"{where}: {stage} imports {module} by its bare folder name: use histoserve.{module}")
                elif module.startswith("<above the root>"):
                    problems.append(f"{where}: {stage} has a relative import above the repository: {module}")
                elif (target := stage_of(module)) is not None and target != stage and target not in allowed:
                    problems.append(f"{where}: {stage} imports {module}")
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


@pytest.mark.parametrize("source, importer, found", [
    ("from histoserve.monitor.service import Monitor\n", "client", "client imports histoserve.monitor.service"),
    ("import histoserve.export.publish\n", "serve", "serve imports histoserve.export.publish"),
    ("from histoserve.client.classifier import TritonClassifier\n", "formats", "formats imports histoserve.client.classifier"),
    ("from ..monitor.service import Monitor\n", "client", "client imports histoserve.monitor.service"),        # relative
    ("from .. import monitor\n", "client", "client imports histoserve.monitor"),                            # relative package
    ("from histoserve import monitor\n", "client", "client imports histoserve.monitor"),                    # package-level
    ("from monitor.service import Monitor\n", "client", "by its bare folder name"),                         # bare stage name
    ("import train\n", "export", "by its bare folder name"),                                                # bare, even if allowed
    ("from ... import x\n", "client", "relative import above the repository"),
], ids=["stage", "import", "formats-upward", "relative", "relative-package", "package-level", "bare", "bare-allowed",
        "above-root"])
def test_the_check_fails_on_a_forbidden_import(tmp_path, source, importer, found):
    for stage in ALLOWED:
        (tmp_path / stage).mkdir()
    (tmp_path / importer / "bad.py").write_text(source)
    [problem] = graph_problems(tmp_path)
    assert problem.startswith(f"{importer}/bad.py:1: ") and found in problem, problem


def test_relative_imports_within_a_stage_are_fine_and_an_unknown_folder_is_not(tmp_path):
    for stage in ALLOWED:
        (tmp_path / stage).mkdir()
    (tmp_path / "client" / "ok.py").write_text("from .classifier import TritonClassifier\nfrom ..formats import options\n")
    assert graph_problems(tmp_path) == []
    (tmp_path / "newstage").mkdir()
    (tmp_path / "newstage" / "thing.py").write_text("import os\n")
    [problem] = graph_problems(tmp_path)
    assert problem.startswith("newstage/: Python files in a folder that is neither a stage")


def test_the_stage_list_is_the_packaged_one():
    """ALLOWED names exactly the folders pyproject.toml packages under histoserve."""
    assert sorted(PACKAGES) == sorted(ALLOWED)


# --- every name imported from the package exists (a rename that missed a benchmark or script) ----


def module_path(root: Path, module: str) -> Path | None:
    """The file of histoserve.<stage>.<...> in the checkout, or None."""
    parts = module.split(".")[1:]
    for candidate in (root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")):
        if parts and candidate.is_file():
            return candidate
    return None


def top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.col_offset == 0:
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.col_offset == 0:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset == 0:
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names


def unresolved_imports(root: Path) -> list[str]:
    problems = []
    for name in python_files(root):
        tree = ast.parse((root / name).read_text(), name)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("histoserve.")):
                continue
            path = module_path(root, node.module)
            if path is None:
                problems.append(f"{name}:{node.lineno}: no module {node.module}")
                continue
            defined = top_level_names(path)
            for alias in node.names:
                if alias.name not in defined and module_path(root, f"{node.module}.{alias.name}") is None:
                    problems.append(f"{name}:{node.lineno}: {node.module} has no {alias.name}")
    return problems


def test_every_name_imported_from_the_package_exists():
    """Read, not imported: benchmarks/ and scripts/ have no test that runs them, so a rename must not
    leave them importing a name that is gone."""
    assert unresolved_imports(ROOT) == []


def test_an_import_of_a_renamed_name_is_caught(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "precision.py").write_text("import numpy as np\nLIMIT = 1\n\ndef onnx_probabilities():\n    pass\n")
    (tmp_path / "bench.py").write_text("from histoserve.export.precision import LIMIT, np, onnx_probabilities\n")
    assert unresolved_imports(tmp_path) == []
    (tmp_path / "bench.py").write_text("from histoserve.export.precision import predict\nfrom histoserve.export.gone import x\n")
    assert unresolved_imports(tmp_path) == ["bench.py:1: histoserve.export.precision has no predict",
                                            "bench.py:2: no module histoserve.export.gone"]
