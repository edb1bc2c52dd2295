"""Code, manifests and tests point readers at the documentation by page and section
(`docs/kubernetes/rollouts.md, "Rollout and rollback"`): each named page exists and has that section,
so moving a section cannot leave a comment or an alert pointing nowhere."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.conftest import ROOT

# a page, not a string literal that names one ("README.md" in code), and the section after it, if any
REFERENCE = re.compile(r'(?<!["\'/\w])((?:docs/[\w./-]+|k8s/README|README)\.md)\b(?:,?\s*(?:#\s*)?\\?"([^"\\]+)\\?")?')
SOURCES = re.compile(r"\.(py|ya?ml|js|mjs|sh)$|(^|/)(Dockerfile|Makefile)$")


def headings(page: Path) -> set[str]:
    return {m.group(1).strip() for m in re.finditer(r"^#+ (.+?)(?: \{#[\w-]+\})?$", page.read_text(), flags=re.MULTILINE)}


def names(heading: str, section: str) -> bool:
    """A reference may give a heading's first words: "Signed versions" for "Signed versions, provenance
    and the model card"."""
    return heading == section or (heading.startswith(section) and heading[len(section)] in " :,")


def reference_problems(root: Path, files: list[str]) -> list[str]:
    problems = []
    for name in files:
        text = (root / name).read_text(errors="replace")
        for match in REFERENCE.finditer(text):
            page, section = root / match.group(1), match.group(2)
            where = f"{name}:{text.count(chr(10), 0, match.start()) + 1}"
            if not page.is_file():
                problems.append(f"{where}: {match.group(1)} does not exist")
            elif section:
                section = re.sub(r"\s*\n\s*(?:#\s*)?", " ", section).strip()
                if not any(names(heading, section) for heading in headings(page)):
                    problems.append(f"{where}: {match.group(1)} has no section {section!r}")
    return problems


def source_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.split()
    return [name for name in listed if SOURCES.search(name) and "/crds/" not in name and "node_modules" not in name
            and (ROOT / name).is_file() and name != "tests/test_doc_references.py"]  # its examples name made-up pages


def test_every_page_and_section_the_code_names_exists():
    assert reference_problems(ROOT, source_files()) == []


def test_a_moved_section_or_page_is_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## Rollout and rollback {#rollout}\n")
    (tmp_path / "a.yaml").write_text('# see docs/page.md, "Rollout and\n# rollback" and docs/page.md\n'
                                     'description: "(docs/page.md, \\"Rollout and rollback\\")"\n')
    assert reference_problems(tmp_path, ["a.yaml"]) == []
    (tmp_path / "b.py").write_text('# docs/page.md, "Canary" and docs/gone.md; docs/page.md, "Rollouts"\n'
                                   'copy(ROOT / "README.md", "x")\n')
    assert reference_problems(tmp_path, ["b.py"]) == ["b.py:1: docs/page.md has no section 'Canary'",
                                                      "b.py:1: docs/gone.md does not exist",
                                                      "b.py:1: docs/page.md has no section 'Rollouts'"]
