"""The documentation site (mkdocs.yml, docs/): it builds with --strict, so a broken link or anchor
fails; every `python -m histoserve.<stage> ...` command in a fenced shell block of docs/ and README.md
parses with that stage's real parser; every command and subcommand has its generated reference entry.
Each check has a self-test that shows it failing."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.parsing import parse_problem as parse_problem_of
from tests.stages import STAGES

DOCS = ROOT / "docs"
SHELL_FENCES = ("bash", "sh", "shell", "console")
FAILS = re.compile(r"#\s*fails\b")  # a command meant to fail says so: `... # fails: <why>`


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    result = mkdocs_build(ROOT / "mkdocs.yml", site)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert warnings == []
    return site


# (a) the site builds strictly


def test_the_site_builds_strictly_with_every_page_in_it(site):
    for page in ("index", "quickstart/index", "figures/index", "guides/data/index", "guides/training/index",
                 "guides/export/index", "guides/serving/index", "guides/client/index", "guides/encoded/index",
                 "guides/slides/index", "guides/loadtest/index", "guides/monitoring/index", "kubernetes/index",
                 "kubernetes/jobs/index", "kubernetes/security/index", "kubernetes/rollouts/index",
                 "kubernetes/deploying/index", "kubernetes/observability/index", "tests/index",
                 "reference/index", "reference/locust/index", *(f"reference/{stage}/index" for stage in STAGES)):
        assert (site / f"{page}.html").is_file(), page


def test_the_pages_k8s_readme_keeps_for_its_tests_are_in_the_site(site):
    """tests/k8s read two sections of k8s/README.md; the site includes them (pymdownx.snippets)."""
    assert 'id="triton-release-and-security-bulletins"' in (site / "kubernetes/security/index.html").read_text()
    assert 'id="moving-onto-the-canary-overlay-and-back"' in (site / "kubernetes/rollouts/index.html").read_text()


def test_a_broken_anchor_or_link_fails_the_build(tmp_path):
    copy = tmp_path / "project"
    copy.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")  # the hook's list of stages
    shutil.copytree(DOCS, copy / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    quickstart = copy / "docs" / "quickstart.md"
    quickstart.write_text(quickstart.read_text() + "\nSee [the contract](guides/export.md#no-such-section).\n")
    result = mkdocs_build(copy / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "does not contain an anchor '#no-such-section'" in result.stderr
    quickstart.write_text(quickstart.read_text().replace("guides/export.md#no-such-section", "guides/no-such-page.md"))
    result = mkdocs_build(copy / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-page.md" in result.stderr


# (b) every documented command parses with the real parser


@dataclass(frozen=True)
class Command:
    where: str        # file:line
    stage: str
    args: tuple[str, ...]
    meant_to_fail: bool


def logical_lines(block: str, first_line: int):
    """(line number, text) of a shell block, backslash continuations joined."""
    number, pending = first_line, ""
    for offset, line in enumerate(block.splitlines()):
        if not pending:
            number = first_line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield number, pending + line
        pending = ""
    if pending:
        yield number, pending


def shell_blocks(path: Path):
    """(first line number, text) of each fenced bash/sh/shell/console block."""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```\s*(\w*)", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```"))
        if fence.group(2) in SHELL_FENCES:
            yield i + 2, "\n".join(line[len(fence.group(1)):] for line in lines[i + 1:end])
        i = end + 1


def commands_in(path: Path, label: str | None = None) -> list[Command]:
    found = []
    for first, block in shell_blocks(path):
        for number, line in logical_lines(block, first):
            if "histoserve." not in line:
                continue
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
            lexer.whitespace_split, lexer.commenters = True, "#"
            words = list(lexer)
            for i in range(len(words) - 1):
                if words[i] == "-m" and words[i + 1].startswith("histoserve."):
                    args = []
                    for word in words[i + 2:]:
                        if word and set(word) <= set(";&|<>"):
                            break
                        args.append(word.removeprefix("[").removesuffix("]"))
                    found.append(Command(f"{label or path.relative_to(ROOT)}:{number}", words[i + 1].removeprefix("histoserve."),
                                         tuple(a for a in args if a), bool(FAILS.search(line))))
    return found


def documented_commands() -> list[Command]:
    pages = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
    return [command for page in pages for command in commands_in(page)]


def parse_problem(command: Command) -> str | None:
    """None when the stage's real parser accepts the command, else why not."""
    return parse_problem_of(command.stage, command.args)


def test_the_docs_show_commands_of_every_stage():
    stages = {command.stage for command in documented_commands()}
    assert set(STAGES) <= stages


def test_every_documented_command_parses_with_the_real_parser():
    problems = []
    for command in documented_commands():
        problem = parse_problem(command)
        if command.meant_to_fail and problem is None:
            problems.append(f"{command.where}: marked `# fails` but parses: {' '.join(command.args)}")
        elif problem and not command.meant_to_fail:
            problems.append(f"{command.where}: python -m histoserve.{command.stage} {' '.join(command.args)}\n    {problem}")
    assert not problems, "\n".join(problems)


def test_a_misspelt_option_or_a_bad_value_fails_the_parse_check(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("\n".join([
        "```bash",
        "python -m histoserve.client classify data/digits/test --url localhost:8001 --model digits \\",
        "    --top-k 3 --jsn",
        "python -m histoserve.client classify FILES --concurrency 0",
        "python -m histoserve.train fit --data data/digits --out runs/x --device gpu",
        "python -m histoserve.loadtest.report reports/locust",
        "python -m histoserve.client classify FILES --url HOST:8001 --model NAME [--json]",
        "OTEL_TRACES_EXPORTER=otlp python -m histoserve.client rollout-status --url HOST:8001 --model M --version 1; echo done",
        "python -m histoserve.client classify FILES --nonsense   # fails: an unknown option",
        "python -m histoserve.loadtest locust --headless --users 8 --triton-urll localhost:8001",
        "python -m histoserve.loadtest locust --headless --users 8 --triton-url localhost:8001 --model digits",
        "```",
    ]) + "\n")
    commands = commands_in(page, "page.md")
    assert [c.where for c in commands] == ["page.md:2", "page.md:4", "page.md:5", "page.md:6", "page.md:7", "page.md:8",
                                           "page.md:9", "page.md:10", "page.md:11"]
    problems = [parse_problem(c) for c in commands]
    assert "unrecognized arguments: --jsn" in problems[0]
    assert "--concurrency" in problems[1]
    assert "--device" in problems[2]
    assert "not a stage's command" in problems[3]
    assert problems[4] is None and commands[4].args[-1] == "--json"
    assert problems[5] is None and commands[5].args[-1] == "1"  # the `; echo done` is not its argument
    assert problems[6] and commands[6].meant_to_fail
    assert "unrecognized arguments: --triton-urll" in problems[7]  # Locust's parser, with the locustfile's options
    assert problems[8] is None


# (c) every command and subcommand has its reference entry


def load_hooks():
    spec = importlib.util.spec_from_file_location("histoserve_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def every_command() -> list[tuple[str, str | None, argparse.ArgumentParser]]:
    found = []
    for stage in STAGES:
        parser = importlib.import_module(f"histoserve.{stage}.__main__").build_parser()
        found.append((stage, None, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found += [(stage, name, subparser) for name, subparser in action.choices.items()]
    return found


def reference_problems(page_html) -> list[str]:
    """What the built reference lacks: a section per subcommand, a row per option string."""
    problems = []
    for stage, name, parser in every_command():
        text = page_html(stage)
        if text is None:
            problems.append(f"no reference page for python -m histoserve.{stage}")
            continue
        section = text
        if name is not None:
            start = text.find(f'id="{name}"')
            if start < 0:
                problems.append(f"python -m histoserve.{stage} {name}: no section in reference/{stage}")
                continue
            end = text.find("<h2", start)
            section = text[start:end if end > 0 else len(text)]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
                continue
            for option in action.option_strings:
                if option in ("-h", "--help"):
                    continue
                if f"<code>{option}</code>" not in section:
                    problems.append(f"python -m histoserve.{stage} {name or ''}: {option} is not in its reference")
    return problems


def test_every_command_subcommand_and_option_has_its_reference_entry(site):
    def page_html(stage):
        path = site / "reference" / stage / "index.html"
        return path.read_text() if path.is_file() else None
    assert reference_problems(page_html) == []
    index = (site / "reference" / "index.html").read_text()
    assert all(f'href="{stage}/"' in index for stage in STAGES)
    locust = (site / "reference" / "locust" / "index.html").read_text()
    assert "<code>--arrival-rate</code>" in locust and "<code>--triton-url</code>" in locust


def test_a_missing_subcommand_or_option_is_caught(site):
    def without(stage, remove):
        def page_html(name):
            text = (site / "reference" / name / "index.html").read_text()
            return text.replace(remove, "") if name == stage else text
        return page_html
    assert any("rollout-status: no section" in p for p in reference_problems(without("client", 'id="rollout-status"')))
    assert any("--arrivals" not in p and "--top-k is not" in p for p in reference_problems(without("client", "<code>--top-k</code>")))
    assert any("no reference page" in p for p in reference_problems(lambda name: None))


def test_the_reference_is_generated_from_the_parsers():
    """The hook renders what the parser holds: a new option appears without touching docs/."""
    hooks = load_hooks()
    parser = argparse.ArgumentParser(prog="python -m histoserve.example")
    parser.add_argument("--answer-within", type=float, default=2.5, help="seconds (default: %(default)s)")
    parser.add_argument("--mode", choices=["fast", "exact"], default="exact")
    table = hooks.options_tables(parser)
    assert "| `--answer-within` | `ANSWER_WITHIN` | `2.5` | seconds (default: 2.5) |" in table
    assert "`fast` \\| `exact`" in table
    assert not list(DOCS.rglob("reference/*.md")), "reference pages are generated at build time, not kept in docs/"
