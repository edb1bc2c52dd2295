"""python -m client classify PATH... --url HOST:PORT --model NAME [--top-k K] [--json]
python -m client rollout-status --url dns:///triton-grpc.NS.svc.cluster.local:8001 --model NAME --version N

classify: PATH may be a file, a folder (searched recursively for images) or a glob. One line per
file; a file that cannot be read gets an error line and the rest are still classified. Exit code: 0
all files classified, 1 some files failed, 2 the server or model could not be used.

rollout-status: waits until every server (every pod behind a headless Service) serves version N.
Exit code: 0 every server has it READY, 1 a server failed to load it (its reason is printed),
2 not every server has it READY (still loading after --timeout, unreachable, or unloaded by the
version policy because newer versions exist).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from dataclasses import asdict
from pathlib import Path

from client.classifier import ClientError, TritonClassifier
from client.preprocessing import find_images
from client.rollout import wait_for_version


def expand_paths(arguments: list[str]) -> list[str]:
    """Files as given; folders and globs expanded to the image files below them, sorted."""
    paths: list[str] = []
    for argument in arguments:
        matches = sorted(glob.glob(argument, recursive=True)) if glob.has_magic(argument) else [argument]
        if not matches:
            paths.append(argument)  # reported as 'no such file' rather than dropped silently
        for match in matches:
            if Path(match).is_dir():
                paths += [str(p) for p in find_images(match)]
            else:
                paths.append(match)
    return list(dict.fromkeys(paths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    classify = commands.add_parser("classify", help="classify image files on a Triton server")
    classify.add_argument("paths", nargs="+", metavar="PATH")
    classify.add_argument("--url", default="localhost:8001",
                          help="Triton gRPC address, or dns:///name:port to balance over every pod behind a "
                               "headless Service (default: %(default)s)")
    classify.add_argument("--model", required=True)
    classify.add_argument("--model-version", default="", help="default: the latest the server has")
    classify.add_argument("--top-k", type=int, default=3)
    classify.add_argument("--json", action="store_true", help="one JSON object per line")
    rollout = commands.add_parser("rollout-status", help="wait until every server serves a model version")
    rollout.add_argument("--url", required=True,
                         help="a server, servers separated by commas, or dns:///name:port for every pod behind a headless Service")
    rollout.add_argument("--model", required=True)
    rollout.add_argument("--version", required=True, type=int)
    rollout.add_argument("--timeout", type=float, default=900.0, help="seconds (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "rollout-status":
        return rollout_status(args)

    paths = expand_paths(args.paths)
    if not paths:
        print("error: no image files found in the given paths", file=sys.stderr)
        return 1
    try:
        classifier = TritonClassifier(args.url, args.model, args.model_version)
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failures = 0
    with classifier:
        for result in classifier.classify_files(paths, args.top_k):
            failures += not result.ok
            if args.json:
                print(json.dumps(asdict(result)), flush=True)
            elif result.ok:
                top = ", ".join(f"{p.label} {p.score:.4f}" for p in result.predictions)
                print(f"{result.path}\t{top}", flush=True)
            else:
                print(f"{result.path}\terror: {result.error}", flush=True)
    if failures:
        print(f"{failures} of {len(paths)} file(s) failed", file=sys.stderr)
    return 1 if failures else 0


def rollout_status(args: argparse.Namespace) -> int:
    try:
        states = wait_for_version(args.url, args.model, str(args.version), args.timeout)
    except (OSError, ValueError) as error:
        print(f"error: cannot resolve {args.url}: {error}", file=sys.stderr)
        return 2
    for state in states:
        print(f"{state.server}\t{args.model} version {args.version}\t{state.state}"
              + (f"\t{state.reason.splitlines()[0]}" if state.reason else ""), flush=True)
    if any(s.state == "UNAVAILABLE" for s in states):
        print(f"error: {args.model} version {args.version} failed to load on "
              f"{sum(s.state == 'UNAVAILABLE' for s in states)} of {len(states)} server(s); they keep serving "
              f"the versions they had. Roll back by moving the version folder out of the repository.", file=sys.stderr)
        return 1
    if not all(s.state == "READY" for s in states):
        print(f"error: {args.model} version {args.version} is not READY on every server (states above; "
              f"waited up to {args.timeout:.0f}s)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
