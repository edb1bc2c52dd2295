"""python -m histoserve.loadtest locust [LOCUST OPTIONS]  Locust with the packaged locustfile (loadtest/locustfile.py)
python -m histoserve.loadtest sweep ...   the highest request rate that meets a p99 SLO (loadtest/sweep.py)
python -m histoserve.loadtest report PREFIX  summarize a headless Locust run written with --csv PREFIX (loadtest/report.py)

`locust` runs Locust itself (`python -m locust -f <the installed locustfile.py> ...`), so the command
works wherever the package is installed; in a checkout, `locust -f loadtest/locustfile.py ...` is the
same. Its options, Locust's and the test's: `python -m histoserve.loadtest locust --help`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from histoserve.formats.options import add_command
from histoserve.loadtest import report, sweep


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m histoserve.loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    locust = commands.add_parser("locust", add_help=False, help="Locust with the packaged locustfile; every option is Locust's")
    locust.set_defaults(run=run_locust, parser=locust)
    add_command(commands, "sweep", sweep, "the highest request rate that meets a p99 SLO")
    add_command(commands, "report", report, "summarize a headless Locust run written with --csv PREFIX")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "locust":
        args.locust_arguments = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.run(args, args.parser)


def locustfile() -> str:
    return importlib.util.find_spec("histoserve.loadtest.locustfile").origin


def run_locust(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Replaces this process (a Job's container keeps one process, which receives the signals)."""
    command = [sys.executable, "-m", "locust", "-f", locustfile(), *args.locust_arguments]
    sys.stdout.flush()
    os.execv(sys.executable, command)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
