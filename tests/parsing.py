"""Parsing a command as written in the docs or a manifest with the stage's real parser, where the
files it names exist only on the reader's machine or in the pod: placeholders (UPPERCASE, <angle>,
$VARIABLE) stand for any value and paths are not looked up; every other value goes through the
option's own type."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

from histoserve.formats import options as option_types
from tests.stages import ROOT, STAGES

PLACEHOLDER = re.compile(r"<[^>]+>|\b[A-Z][A-Z0-9_]*\b")
FILESYSTEM_TYPES = (option_types.existing_file, option_types.existing_folder, option_types.output_file)


class Choices(list):
    """An option's choices, and any placeholder."""

    def __contains__(self, value) -> bool:
        return bool(isinstance(value, str) and PLACEHOLDER.search(value)) or list.__contains__(self, value)


def lenient(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser, with placeholders (UPPERCASE, <angle>) accepted as any value and paths not looked up
    (the docs name files that exist only on the reader's machine); every other value goes through the
    option's own type, so a negative count or an unknown choice still fails."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                lenient(subparser)
        kind = action.type
        if kind in FILESYSTEM_TYPES:
            kind = Path

        def convert(text, kind=kind):
            if PLACEHOLDER.search(text) or kind is None:
                return text
            return kind(text)

        convert.__name__ = getattr(kind, "__name__", "value")
        action.type = convert
        if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
            action.choices = Choices(action.choices)
    return parser


def parse_problem(stage: str, args: list[str] | tuple[str, ...]) -> str | None:
    """None when `python -m histoserve.<stage> ARGS` parses with the stage's real parser (leniently), else why not."""
    if stage not in STAGES:
        return f"python -m histoserve.{stage} is not a stage's command ({', '.join(STAGES)})"
    if stage == "loadtest" and list(args[:1]) == ["locust"]:
        return locust_problem(list(args[1:]))
    parser = lenient(importlib.import_module(f"histoserve.{stage}.__main__").build_parser())
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(list(args))
    except SystemExit as exit:
        if exit.code not in (0, None):
            return stderr.getvalue().strip().splitlines()[-1]
    return None


def locust_problem(args: list[str], site: Path | None = None, cwd: Path = ROOT) -> str | None:
    """`python -m histoserve.loadtest locust ARGS` hands ARGS to Locust, whose parser holds the
    locustfile's options only once the file is loaded (and that patches gevent into the process): so
    a subprocess, with --list, which parses everything and stops before any load. `site`: an unpacked
    wheel to run instead of the checkout (first on PYTHONPATH)."""
    env = {**os.environ, "PYTHONPATH": str(site)} if site else None
    result = subprocess.run([sys.executable, "-m", "histoserve.loadtest", "locust", *args, "--list"], capture_output=True,
                            text=True, timeout=120, cwd=cwd, env=env)
    if result.returncode == 0:
        return None
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    return (errors or result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
