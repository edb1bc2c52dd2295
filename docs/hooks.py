"""MkDocs hook (mkdocs.yml `hooks:`): the command reference, generated at build time.

Every page under reference/ is rendered from the parsers the commands themselves use: each stage's
`histoserve.<stage>.__main__.build_parser()`, and the options loadtest/locustfile.py adds to Locust's
parser (read in a subprocess: the locustfile patches gevent into the process that imports it). Nothing
of it is written by hand or kept in git, so the reference cannot drift from the code.
"""

from __future__ import annotations

import argparse
import html
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
# the stages as pyproject.toml lists them (its [tool.setuptools] packages), those with a command
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
PACKAGES = [name.removeprefix("histoserve.") for name in SETUPTOOLS["packages"]]
STAGES = tuple(package for package in PACKAGES if importlib.util.find_spec(f"histoserve.{package}.__main__"))
SUMMARIES = {  # a stage without one fails the build
    "client": "classify files, whole slides and their viewer; wait for a rollout",
    "train": "demo data, dataset preparation, training, evaluation, augmentation previews",
    "export": "ONNX export, gates and publishing a model version into a Triton model repository",
    "serve": "the real Triton locally, and what each Kubernetes pod runs (stage, golden-gate)",
    "monitor": "the drift monitor service and its offline report",
    "loadtest": "Locust with the project's locustfile, the SLO sweep and the Locust run report",
}


def build_parser(stage: str) -> argparse.ArgumentParser:
    """The stage's own parser, exactly as `python -m histoserve.<stage>` builds it."""
    return importlib.import_module(f"histoserve.{stage}.__main__").build_parser()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    """name -> (subparser, help) of the parser's subcommands, in the order they were added."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, subparser in action.choices.items():
                found[name] = (subparser, helps.get(name, ""))
    return found


def _cell(text) -> str:
    return html.escape(" ".join(str(text).split()), quote=False).replace("|", "\\|")


def _help(action: argparse.Action, prog: str) -> str:
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    return argparse.HelpFormatter(prog)._expand_help(action)


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices is not None:
        return " \\| ".join(f"`{choice}`" for choice in action.choices)
    metavar = action.metavar or (action.dest if not action.option_strings else action.dest.upper())
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    suffix = {"?": " (optional)", "*": " ...", "+": " [...]"}.get(action.nargs, "")
    return f"`{metavar}`{suffix}"


def _default(action: argparse.Action) -> str:
    default = action.default
    if action.nargs == 0 or default is None or default == argparse.SUPPRESS or action.required:
        return ""
    if isinstance(default, (list, tuple)):
        default = ",".join(str(item) for item in default)
    return f"`{_cell(default)}`" if str(default) != "" else '`""`'


def options_tables(parser: argparse.ArgumentParser) -> str:
    """Markdown tables of a parser's positional arguments and options (subcommands have their own sections)."""
    positionals, options = [], []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            names = ", ".join(f"`{name}`" for name in action.option_strings)
            options.append(f"| {names} | {_value(action)} | {_default(action)} | {_cell(_help(action, parser.prog))} |")
        else:
            positionals.append(f"| `{action.metavar or action.dest}` | {_value(action).replace(' (optional)', '')} "
                               f"| {_cell(_help(action, parser.prog))} |")
    parts = []
    if positionals:
        parts += ["**Arguments**", "", "| argument | takes | help |", "|---|---|---|", *positionals, ""]
    if options:
        parts += ["**Options**", "", "| option | takes | default | help |", "|---|---|---|---|", *options, ""]
    return "\n".join(parts)


def _text_block(text: str) -> str:
    return f"```text\n{textwrap.dedent(text).strip()}\n```\n"


def command_section(parser: argparse.ArgumentParser, title: str, summary: str, level: int) -> str:
    lines = [f"{'#' * level} {title}", ""]
    if summary:
        lines += [_cell(summary)[:1].upper() + _cell(summary)[1:] + ".", ""]
    lines += [_text_block(parser.format_usage().removeprefix("usage: ")), ""]
    if parser.description:
        lines += [_text_block(parser.description), ""]
    lines.append(options_tables(parser))
    return "\n".join(lines)


def stage_page(stage: str) -> str:
    parser = build_parser(stage)
    commands = subcommands(parser)
    intro = (f"Generated at build time from `histoserve.{stage}.__main__.build_parser()`; "
             f"`python -m histoserve.{stage} --help` prints the same.")
    parts = [f"# python -m histoserve.{stage}", "", intro, ""]
    parts.append(command_section(parser, f"python -m histoserve.{stage}", SUMMARIES[stage], 2)
                 .replace(f"## python -m histoserve.{stage}\n", "## Usage {#usage}\n", 1))
    for name, (subparser, help_text) in commands.items():
        parts.append(command_section(subparser, name, help_text, 2)
                     .replace(f"## {name}\n", f"## {name} {{#{name}}}\n", 1))
    return "\n".join(parts)


LOCUST_OPTIONS = r"""
import configargparse, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("histoserve_locustfile", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
parser = configargparse.ArgumentParser(prog="locust")
module.add_arguments(parser)
rows = []
for action in parser._actions:
    if action.option_strings and action.dest != "help":
        rows.append({"options": action.option_strings, "nargs": action.nargs, "metavar": action.metavar,
                     "dest": action.dest, "choices": list(action.choices) if action.choices else None,
                     "default": None if action.default is None else str(action.default),
                     "help": action.help or "", "env_var": getattr(action, "env_var", None)})
print(json.dumps(rows))
"""


def locust_page() -> str:
    package = importlib.util.find_spec("histoserve.loadtest")
    locustfile = Path(package.submodule_search_locations[0]) / "locustfile.py"
    result = subprocess.run([sys.executable, "-c", LOCUST_OPTIONS, str(locustfile)], capture_output=True, text=True,
                            timeout=120, cwd=locustfile.parent)
    if result.returncode != 0:
        raise RuntimeError(f"reading loadtest/locustfile.py's options failed:\n{result.stderr}")
    rows = ["| option | takes | default | environment | help |", "|---|---|---|---|---|"]
    for row in json.loads(result.stdout):
        names = ", ".join(f"`{name}`" for name in row["options"])
        if row["nargs"] == 0:
            takes, default = "", ""
        else:
            takes = (" \\| ".join(f"`{c}`" for c in row["choices"]) if row["choices"]
                     else f"`{row['metavar'] or row['dest'].upper()}`")
            default = "" if row["default"] is None else (f"`{_cell(row['default'])}`" if row["default"] else '`""`')
        env = f"`{row['env_var']}`" if row["env_var"] else ""
        rows.append(f"| {names} | {takes} | {default} | {env} | {_cell(row['help'])} |")
    return "\n".join([
        "# python -m histoserve.loadtest locust",
        "",
        "Generated at build time from the options `loadtest/locustfile.py` adds to Locust's parser (its "
        "`init_command_line_parser` listener). Locust's own options (`--users`, `--spawn-rate`, `--run-time`, "
        "`--headless`, `--csv`, `--html`, `--master`, `--worker`, ...) are Locust's: "
        "`python -m histoserve.loadtest locust --help`. In a checkout, `locust -f loadtest/locustfile.py` runs the same file. "
        "The guide: [Load tests](../guides/loadtest.md).",
        "",
        "```text",
        "python -m histoserve.loadtest locust [Locust's options] [the options below]",
        "```",
        "",
        "## Options {#options}",
        "",
        *rows,
        "",
    ])


def index_page() -> str:
    lines = ["# Command reference", "",
             "Every command runs as `python -m histoserve.<stage> ...` (from the repository root, or anywhere once "
             "installed). These pages are generated from the parsers themselves when the site is built, so each "
             "lists exactly what `--help` prints: every option, what it takes, its default and its help.", "",
             "| command | what | subcommands |", "|---|---|---|"]
    for stage in STAGES:
        names = ", ".join(f"[`{name}`]({stage}.md#{name})" for name in subcommands(build_parser(stage)))
        lines.append(f"| [`python -m histoserve.{stage}`]({stage}.md) | {SUMMARIES[stage]} | {names} |")
    lines.append("| [`python -m histoserve.loadtest locust`](locust.md) | the load itself: Locust with the project's gRPC user "
                 "(closed or open loop) | |")
    return "\n".join(lines) + "\n"


def reference_pages() -> dict[str, str]:
    """src path under docs/ -> Markdown, for every reference page."""
    os.environ.setdefault("COLUMNS", "100")  # usage lines wrap alike on every machine
    pages = {"reference/index.md": index_page(), "reference/locust.md": locust_page()}
    for stage in STAGES:
        pages[f"reference/{stage}.md"] = stage_page(stage)
    return pages


def on_files(files, config):
    from mkdocs.structure.files import File

    for path, content in reference_pages().items():
        files.append(File.generated(config, path, content=content))
    return files
