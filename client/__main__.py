"""python -m histoserve.client classify PATH... --url HOST:PORT --model NAME [--top-k K] [--json]
python -m histoserve.client slide SLIDE... --url HOST:PORT --model NAME --out DIR [--mpp M] [--tile-px P] [--min-tissue F]
python -m histoserve.client slide-view DIR/SLIDE_STEM [--port 8080] [--host 127.0.0.1] [--slide PATH] [--export FOLDER]
python -m histoserve.client rollout-status --url dns:///triton-grpc.NS.svc.cluster.local:8001 --model NAME --version N \
    --admin-key-file KEY

classify: PATH may be a file, a folder (searched recursively for images) or a glob. One line per
file, in input order; a file that cannot be read gets an error line and the rest are still
classified. --concurrency batches are preprocessed and in flight at once; each request is retried
through restarts and rollouts until its --deadline-s. Exit code: 0 all files
classified, 1 some files failed, 2 the server or model could not be used, 130 interrupted (Ctrl-C;
the lines printed so far are complete).

--model may name a pixel model (files preprocessed here) or its encoded twin, NAME-encoded (files sent
as they are, preprocessed by the server; a file the server refuses gets its error line and the rest
of its request is sent again).

Metrics: with OTEL_METRICS_EXPORTER set (otlp, prometheus, console) and OpenTelemetry's other standard
variables (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, ...), classify exports what it got: calls and
attempts by model, version and gRPC status, and call durations (histoserve.client.telemetry; needs
`pip install histoserve[telemetry]`). Unset, nothing is exported.

Traces: with OTEL_TRACES_EXPORTER set (otlp, console) and the same variables (OTEL_TRACES_SAMPLER, ...),
each request is a span (histoserve.classify, with a span per file and per gRPC attempt) whose context
travels to Triton in `traceparent`, so Triton's spans join the trace (histoserve.client.tracing); --json
lines carry each file's `trace_id`. Unset, nothing is traced and `trace_id` is null.

slide: every tissue tile of each whole-slide image (what OpenSlide opens) at --mpp µm/px, through the
same preprocessing and client, into DIR/<slide stem>/: tiles.csv, tiles.geojson (QuPath), heatmap.png,
summary.json; resumable, one error line for a slide that cannot be read (histoserve.client.slide; needs
`pip install histoserve[slide]`).

slide-view: a result folder of `slide` in the browser: the slide as Deep Zoom tiles in OpenSeadragon,
overlay.png as a toggleable heatmap over it, each tile's classes on hover or click; --export FOLDER
writes a static copy instead (histoserve.client.slide_view; needs `pip install histoserve[slide]`).

rollout-status: waits until every server (every Ready pod behind a headless Service) serves version
N: the check, from the callers' side, that a new ReplicaSet (or a promoted canary) has replaced the
old one. It reads each server's repository index, an admin API: pass the servers' admin key
(--admin-key-file, or HISTOSERVE_ADMIN_KEY). Exit code: 0 every server has it READY, 1 a server
failed to load it (poll mode; its reason is printed), 2 not every server has it READY after
--timeout (old pods still serve another version, still loading, unreachable, the admin key refused,
or unloaded by the version policy because newer versions exist).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from histoserve.client.classifier import ClientError, FileResult, TritonClassifier
from histoserve.client.record_sender import TOKEN_VARIABLE, MonitorSender, MonitorTokenError, monitor_token
from histoserve.client.rollout import wait_for_version
from histoserve.client.slide_view import add_arguments as add_slide_view_arguments
from histoserve.client.slide_view import slide_view_command
from histoserve.client.telemetry import TelemetryConfigError, configure_from_environment
from histoserve.client.tracing import configure_tracing_from_environment
from histoserve.formats.admin import ENVIRONMENT_VARIABLE, AdminKey, AdminKeyError
from histoserve.formats.options import FRACTION, POSITIVE, POSITIVE_INT, OptionError, add_tls_arguments, output_file, tls_from
from histoserve.formats.preprocessing import find_images


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m histoserve.client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    add_classify_arguments(commands.add_parser("classify", help="classify image files on a Triton server"))
    add_slide_arguments(commands.add_parser(
        "slide", help="classify the tissue tiles of whole-slide images (histoserve.client.slide)"))
    add_slide_view_arguments(commands.add_parser(
        "slide-view", help="view a slide's results in the browser, or export them (histoserve.client.slide_view)"))
    add_rollout_arguments(commands.add_parser("rollout-status", help="wait until every server serves a model version"))
    for name, run in (("classify", classify), ("slide", classify_slides_command), ("slide-view", slide_view_command),
                      ("rollout-status", rollout_status)):
        commands.choices[name].set_defaults(run=run)
    return parser


def add_classify_arguments(classify: argparse.ArgumentParser) -> None:
    classify.add_argument("paths", nargs="+", metavar="PATH")
    classify.add_argument("--url", default="localhost:8001",
                          help="Triton gRPC address, or dns:///name:port to balance over every pod behind a "
                               "headless Service (default: %(default)s)")
    classify.add_argument("--model", required=True)
    classify.add_argument("--model-version", default="", help="default: the latest the server has")
    classify.add_argument("--top-k", type=POSITIVE_INT, default=3, help="labels per file (default: %(default)s)")
    classify.add_argument("--json", action="store_true", help="one JSON object per line")
    classify.add_argument("--concurrency", type=POSITIVE_INT, default=4,
                          help="batches preprocessed and requests in flight at once (default: %(default)s)")
    classify.add_argument("--batch-size", type=POSITIVE_INT, help="files per request (default and at most: the model's max batch size)")
    classify.add_argument("--output", type=output_file, help="write the result lines to this file instead of stdout")
    add_tls_arguments(classify)
    classify.add_argument("--monitor-url",
                          help="also send a prediction record per file to this monitor (python -m histoserve.monitor serve), in the "
                               "background: a monitor that is down never slows or fails classification")
    classify.add_argument("--monitor-token-file", type=Path,
                          help=f"the writer's bearer token for the monitor (default: ${TOKEN_VARIABLE})")
    classify.add_argument("--deadline-s", type=POSITIVE, default=60.0,
                          help="per request, retries included: a server that is restarting or rolling out is waited "
                               "for and retried until then (default: %(default)s)")


def add_slide_arguments(slide: argparse.ArgumentParser) -> None:
    slide.add_argument("slides", nargs="+", metavar="SLIDE", type=Path)
    slide.add_argument("--url", default="localhost:8001", help="Triton gRPC address, or dns:///name:port (default: %(default)s)")
    slide.add_argument("--model", required=True, help="the pixel model (tiles are preprocessed here)")
    slide.add_argument("--model-version", default="", help="default: the latest the server has")
    slide.add_argument("--out", type=Path, required=True, help="results go to OUT/<slide stem>/")
    slide.add_argument("--mpp", type=POSITIVE, help="µm per pixel to tile at (default: the slide's level 0)")
    slide.add_argument("--tile-px", type=POSITIVE_INT, help="tile side in pixels at --mpp (default: the model's resize size)")
    slide.add_argument("--stride-px", type=POSITIVE_INT, help="pixels between tiles at --mpp (default: the tile side)")
    slide.add_argument("--min-tissue", type=FRACTION, default=0.5,
                       help="classify tiles with at least this tissue fraction; 0: every tile (default: %(default)s)")
    slide.add_argument("--assume-mpp", type=POSITIVE, help="µm per level-0 pixel for slides whose files do not say")
    slide.add_argument("--workers", type=POSITIVE_INT, default=2, help="tile-reading processes (default: %(default)s)")
    slide.add_argument("--concurrency", type=POSITIVE_INT, default=4, help="requests in flight (default: %(default)s)")
    slide.add_argument("--batch-size", type=POSITIVE_INT, help="tiles per request (default and at most: the model's max batch size)")
    slide.add_argument("--deadline-s", type=POSITIVE, default=60.0, help="per request, retries included (default: %(default)s)")
    slide.add_argument("--json", action="store_true", help="one JSON line per slide (its summary or its error)")
    add_tls_arguments(slide)


def add_rollout_arguments(rollout: argparse.ArgumentParser) -> None:
    rollout.add_argument("--url", required=True,
                         help="a server, servers separated by commas, or dns:///name:port for every pod behind a headless Service")
    rollout.add_argument("--model", required=True)
    rollout.add_argument("--version", required=True, type=POSITIVE_INT)
    rollout.add_argument("--timeout", type=POSITIVE, default=900.0, help="seconds (default: %(default)s)")
    rollout.add_argument("--admin-key-file", type=Path,
                         help=f"the servers' admin key: the repository index is an admin API (default: ${ENVIRONMENT_VARIABLE})")
    add_tls_arguments(rollout)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "slide-view":  # no server, no TLS: a local result folder
        return slide_view_command(args)
    try:  # every option checked before any work: no server is called with a bad one
        args.tls = tls_from(args)
        if args.command == "rollout-status":
            args.admin_key = AdminKey.resolve(args.admin_key_file)
        elif args.command == "classify":
            args.monitor_token = monitor_token(args.monitor_token_file) if args.monitor_url else None
    except (OptionError, AdminKeyError, MonitorTokenError) as error:
        parser.error(str(error))
    return args.run(args)


def classify_slides_command(args: argparse.Namespace) -> int:
    """Exit code: 0 every slide classified, 1 a slide failed (its error line says why) or some of its
    tiles did (a rerun does them), 2 the server or model cannot be used, 130 interrupted (a rerun
    continues where it stopped)."""
    from histoserve.client.slide import SlideOptions, classify_slides

    options = SlideOptions(args.mpp, args.tile_px, args.stride_px, args.min_tissue, args.assume_mpp, args.workers,
                           args.concurrency, args.batch_size)
    worst = 0
    try:
        with TritonClassifier(args.url, args.model, args.model_version, args.deadline_s, args.tls) as classifier:
            for result in classify_slides(args.slides, classifier, args.out, options):
                worst = max(worst, 0 if result.ok else 1)
                if args.json:
                    print(json.dumps({"slide": result.slide, "error": result.error, "skipped": result.skipped,
                                      "out": str(result.out) if result.out else None, "summary": result.summary or None}), flush=True)
                elif result.error:
                    print(f"{result.slide}\terror: {result.error}", flush=True)
                else:
                    tiles, verdict = result.summary["tiles"], result.summary["slide_result"]
                    print(f"{result.slide}\t{'already done' if result.skipped else 'done'}: {tiles['classified']} tiles of "
                          f"{tiles['grid']} ({tiles['failed']} failed), slide: {verdict['label']} "
                          f"({verdict['share'] or 0:.1%} of tiles) -> {result.out}", flush=True)
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue", file=sys.stderr)
        return 130
    return worst


def classify(args: argparse.Namespace) -> int:
    paths = expand_paths(args.paths)
    if not paths:
        print("error: no image files found in the given paths", file=sys.stderr)
        return 1
    try:  # OTEL_METRICS_EXPORTER, OTEL_TRACES_EXPORTER and the other standard variables; nothing when unset
        providers = [p for p in (configure_from_environment(), configure_tracing_from_environment()) if p is not None]
    except TelemetryConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        return classify_paths(paths, args)
    finally:
        for provider in providers:
            provider.shutdown()  # exports the metrics and spans not sent yet


def classify_paths(paths: list[str], args: argparse.Namespace) -> int:
    monitor = MonitorSender(args.monitor_url, args.monitor_token) if args.monitor_url else None
    try:
        classifier = TritonClassifier(args.url, args.model, args.model_version, deadline_s=args.deadline_s, tls=args.tls,
                                      monitor=monitor)
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        if monitor is not None:
            monitor.close(0)
        return 2
    if monitor is not None and classifier.spec is None:
        print(f"error: --monitor-url: {args.model} is an encoded model, whose pixels only the server sees; the drift "
              f"monitor's records need them: classify with the pixel model", file=sys.stderr)
        classifier.close()
        monitor.close(0)
        return 2
    tally = Tally()
    try:
        with classifier, (open(args.output, "w") if args.output else contextlib.nullcontext(sys.stdout)) as output:
            write_results(classifier, paths, args, output, tally)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {tally.done} of {len(paths)} file(s) classified, results above"
              + (f" and in {args.output}" if args.output else ""), file=sys.stderr)
        return 130
    finally:
        if monitor is not None:
            monitor.close(wait_s=2.0)
            if monitor.dropped:
                reason = monitor.last_error or "no answer from the monitor in time"
                print(f"monitor: {monitor.dropped} record(s) dropped, {monitor.sent} sent ({reason})", file=sys.stderr)
    if tally.failed:
        print(f"{tally.failed} of {len(paths)} file(s) failed", file=sys.stderr)
    return 1 if tally.failed else 0


@dataclass
class Tally:
    done: int = 0
    failed: int = 0


def write_results(classifier: TritonClassifier, paths: list[str], args: argparse.Namespace, output, tally: Tally) -> None:
    """One line per file as its result arrives, in input order, counted in `tally`."""
    progress = StatusLine(len(paths)) if sys.stderr.isatty() else None
    try:
        for result in classifier.classify_files(paths, args.top_k, args.concurrency, args.batch_size):
            tally.failed += not result.ok
            tally.done += 1
            print(format_result(result, args.json), file=output, flush=True)
            if progress:
                progress.update(tally.done, tally.failed)
    finally:
        if progress:
            progress.close()


def format_result(result: FileResult, as_json: bool) -> str:
    if as_json:
        return json.dumps(asdict(result))
    if result.ok:
        return f"{result.path}\t" + ", ".join(f"{p.label} {p.score:.4f}" for p in result.predictions)
    return f"{result.path}\terror: {result.error}"


class StatusLine:
    """One status line on stderr, redrawn at most every 0.2 s; only used when stderr is a terminal."""

    def __init__(self, total: int):
        self.total, self.started, self.shown = total, time.monotonic(), 0.0

    def update(self, done: int, failures: int) -> None:
        now = time.monotonic()
        if now - self.shown < 0.2 and done < self.total:
            return
        self.shown = now
        rate = done / max(now - self.started, 1e-9)
        print(f"\r{done}/{self.total} files, {failures} failed, {rate:.1f} files/s", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr, flush=True)


def rollout_status(args: argparse.Namespace) -> int:
    try:
        states = wait_for_version(args.url, args.model, str(args.version), args.timeout, admin_key=args.admin_key, tls=args.tls)
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
    if refused := sum(s.state == "REFUSED" for s in states):
        print(f"error: {refused} of {len(states)} server(s) refused to show their repository index: "
              f"{'the admin key is wrong' if args.admin_key else 'no admin key was given'} "
              f"(--admin-key-file, or {ENVIRONMENT_VARIABLE})", file=sys.stderr)
        return 2
    if not all(s.state == "READY" for s in states):
        print(f"error: {args.model} version {args.version} is not READY on every server (states above; "
              f"waited up to {args.timeout:.0f}s)", file=sys.stderr)
        if old := sum(s.state == "OTHER_VERSION" for s in states):
            print(f"{old} server(s) still serve another version: pods of the previous ReplicaSet, kept while the new pods "
                  f"are not Ready. `kubectl rollout status deploy/triton` tells whether the rollout still progresses; the new "
                  f"pods' model-stage and golden-gate logs say why one is not Ready "
                  f"(docs/kubernetes/rollouts.md, \"Rollout and rollback\")",
                  file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
