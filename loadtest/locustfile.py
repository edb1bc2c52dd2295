"""Locust load test for a histoserve model on Triton over gRPC, closed or open loop.

    # closed loop: 8 users, each sends its next request when the last one returns
    python -m histoserve.loadtest locust --headless --users 8 --spawn-rate 8 --run-time 30s \
        --triton-url localhost:8001 --model digits --images data/digits/test \
        --csv reports/locust --html reports/locust.html
    # open loop: 40 requests/s (Poisson arrivals) shared by every user and worker process
    python -m histoserve.loadtest locust --headless --users 32 --spawn-rate 32 --run-time 60s --processes 2 \
        --arrival-rate 40 --triton-url localhost:8001 --model digits --summary-json reports/open.json

Each simulated user holds its own gRPC channel and sends real images, preprocessed once per process
with the client's preprocessing (the server's contract), as uint8 batches of --batch-size; with
--decode-per-request each request reads and preprocesses its files instead (what a calling service
pays). Every answer's top-1 is checked against the prediction made for that image before the run
(--expected, or computed at start); a wrong one is a failure: dynamic batching must never return
another request's row.

Open loop (--arrival-rate): send times are fixed in advance (loadtest/arrivals.py); each request has
a *service* latency (from when it was sent) and a *response* latency (from when it was meant to be
sent, corrected for coordinated omission); Locust's statistics and --fail-p99-ms use the response
latency. Latencies are kept in HDR histograms per --window-s window (loadtest/windows.py), merged
from every worker on the master; --stop-when-stable ends the run once the last --stable-windows
windows agree within --stable-tolerance (perf_analyzer's rule). --summary-json writes every window
and the totals (of the stable windows with --stop-when-stable, else of every window after warm-up).

Tracing: --trace-share F traces that share of requests (a histoserve.classify span per request, whose
context goes to Triton in `traceparent`, so Triton traces exactly those: client/tracing.py), exported
as OpenTelemetry's standard variables say (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, ...; otlp
unless OTEL_TRACES_EXPORTER names another). Without it, OTEL_TRACES_EXPORTER and OTEL_TRACES_SAMPLER
configure tracing as for `python -m histoserve.client classify`; with neither, nothing is traced. The local
Triton 2.51 crashes under concurrent traced requests at high rates (fixed in 25.04; docs/kubernetes/observability.md,
"Tracing"): keep the share small against it.

Exit codes: 0 passed; 1 Locust's own failure (any failed request without --fail-ratio, or workers
missing after --expect-workers-max-wait); 2 nothing can be measured (model missing, no readable
image); 3 a threshold failed (--fail-p99-ms, --fail-ratio); 4 the run is not valid: no request was
sent, a worker was lost during the run (fewer than --expect-workers were still there at the end), or
in open loop the generator could not keep the offered rate (more than --max-late-share of requests
sent over --late-ms after their intended time, or a Locust process at ≥ 90 % CPU).
"""

# grpc must be patched for gevent before anything imports it; without this only one request is ever
# in flight per process and the measured load is silently understated (measured here: 19.6 vs 24.7 req/s).
from grpc.experimental import gevent as grpc_gevent

grpc_gevent.init_gevent()

import atexit  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import numpy as np  # noqa: E402
from locust import User, constant, events, task  # noqa: E402
from locust.exception import StopUser  # noqa: E402
from locust.runners import MasterRunner, WorkerRunner  # noqa: E402

from histoserve.client import tracing  # noqa: E402
from histoserve.client.classifier import ClientError, TritonClassifier  # noqa: E402
from histoserve.client.record_sender import MonitorSender, monitor_token  # noqa: E402
from histoserve.client.telemetry import TelemetryConfigError  # noqa: E402
from histoserve.formats.options import FRACTION, add_tls_arguments, environment_variable, tls_from  # noqa: E402
from histoserve.formats.preprocessing import preprocess_file  # noqa: E402
from histoserve.formats.records import records_for  # noqa: E402
from histoserve.loadtest.arrivals import DISTRIBUTIONS  # noqa: E402
from histoserve.loadtest.expectations import expected_predictions, read_expected, request_images  # noqa: E402
from histoserve.loadtest.judgement import RunFacts, Thresholds, exit_code, invalid_reasons, threshold_failures  # noqa: E402
from histoserve.loadtest.open_loop import OpenLoop, WindowBook  # noqa: E402
from histoserve.loadtest.windows import Window, merged  # noqa: E402


@events.init_command_line_parser.add_listener
def add_arguments(parser):
    """The test's options, each also read from its environment variable (HISTOSERVE_TRITON_URL for
    --triton-url: formats.options.environment_variable), so a Job sets its workers' options once."""
    group = parser.add_argument_group("histoserve", "Triton model under test")
    add_option(group, "--triton-url", default="localhost:8001", help="Triton gRPC address")
    add_option(group, "--model", default="digits", help="model name")
    add_tls_arguments(group, environment=True)
    add_option(group, "--images", default="data/digits/test", help="folder of images to send (searched recursively)")
    add_option(group, "--max-images", type=int, default=512, help="use the first N images of the folder")
    add_option(group, "--batch-size", type=int, default=1, help="images per request")
    add_option(group, "--decode-per-request", action="store_true",
               help="each request reads and preprocesses its files (default: preprocessed once per process)")
    add_option(group, "--expected", default="",
               help="JSON {path: [accepted top-1 indices]} made before the run (default: computed at start)")
    add_option(group, "--fail-p99-ms", type=float, default=0.0, help="exit with code 3 when the p99 latency is above this (0: no limit)")
    add_option(group, "--fail-ratio", type=float, default=-1.0,
               help="exit with code 3 when the failed share of requests is above this (-1: Locust's "
                    "own rule, any failure exits 1)")
    add_option(group, "--arrival-rate", type=float, default=0.0,
               help="open loop: requests/s offered by all users and workers together (0: closed loop)")
    add_option(group, "--arrival-distribution", choices=DISTRIBUTIONS, default="poisson", help="open loop: gaps between sends")
    add_option(group, "--late-ms", type=float, default=10.0,
               help="open loop: a request sent more than this after its intended time is late")
    add_option(group, "--max-late-share", type=float, default=0.01,
               help="open loop: a larger share of late requests makes the run invalid (exit 4)")
    add_option(group, "--window-s", type=float, default=5.0, help="measurement window (perf_analyzer's is 5 s)")
    add_option(group, "--stable-windows", type=int, default=3, help="windows that must agree to call the load stable")
    add_option(group, "--stable-tolerance", type=float, default=0.1, help="how closely they must agree (fraction of their mean)")
    add_option(group, "--stop-when-stable", action="store_true",
               help="end the run as soon as the load is stable (--run-time still caps it)")
    add_option(group, "--monitor-url", default="",
               help="also send a prediction record per image to this drift monitor (python -m histoserve.monitor serve)")
    add_option(group, "--monitor-token-file", default="",
               help="the writer's bearer token for the monitor (default: $HISTOSERVE_MONITOR_TOKEN)")
    add_option(group, "--trace-share", type=FRACTION, default=0.0,
               help="trace this share of requests, 0 to 1 (OpenTelemetry, exported as the OTEL_* variables say)")
    add_option(group, "--summary-json", default="", help="write the windows and totals here (also PREFIX_summary.json with --csv)")


def add_option(group, option: str, **settings) -> None:
    group.add_argument(option, env_var=environment_variable(option), **settings)


@dataclass
class Inputs:
    """One process's images: paths, preprocessed arrays, and the top-1 indices accepted for each."""

    paths: list[str]
    arrays: np.ndarray
    accepted: list[frozenset[int]]


_inputs: dict[tuple, Inputs] = {}


def load_inputs(options, classifier: TritonClassifier) -> Inputs:
    """Preprocess up to --max-images images once per process and know the right answer for each
    before the first timed request."""
    key = (options.images, options.max_images, classifier.spec, options.expected)
    if key not in _inputs:
        paths, images = request_images(options.images, classifier.spec, options.max_images)
        accepted = read_expected(options.expected, paths) if options.expected else expected_predictions(classifier, images)
        _inputs[key] = Inputs(paths, images, accepted)
    return _inputs[key]


class WrongPrediction(AssertionError):
    """The server answered with another image's class: counted as a failed request."""


class Run:
    """This process's open-loop state (formats in loadtest/open_loop.py), wired to Locust: windows are
    flushed every 0.25 s, a worker sends them to the master, the master books them."""

    def __init__(self):
        self.loop: OpenLoop | None = None
        self.book: WindowBook | None = None
        self.flusher = None

    def start(self, environment) -> None:
        options, runner = environment.parsed_options, environment.runner
        self.loop = OpenLoop(options.window_s, options.arrival_rate, options.arrival_distribution,
                             getattr(runner, "worker_index", 0))
        if self.book is None:
            self.book = book_for(options)
        if not isinstance(runner, MasterRunner):
            self.flusher = gevent.spawn(self.flush_forever, environment)

    def next_send(self, environment) -> float:
        total = environment.parsed_options.num_users or 1
        return self.loop.next_send(time.perf_counter(), environment.runner.user_count, total)

    def flush_forever(self, environment) -> None:
        while True:
            gevent.sleep(0.25)
            self.flush(environment, time.time())

    def flush(self, environment, now: float) -> None:
        for window in self.loop.closed_windows(now, environment.runner.current_cpu_usage):
            if isinstance(environment.runner, WorkerRunner):
                environment.runner.send_message("histoserve_window", window.to_message())
            else:
                book_window(environment, window)

    def stop(self, environment) -> None:
        if self.flusher is not None:
            self.flusher.kill()
            self.flusher = None
        if self.loop is not None:
            self.flush(environment, time.time())  # windows that ended; the one under way is partial: dropped


def book_for(options) -> WindowBook:
    return WindowBook(options.stable_windows, options.stable_tolerance, open_loop=options.arrival_rate > 0)


def book_window(environment, window: Window) -> None:
    runner, options = environment.runner, environment.parsed_options
    if RUN.book is None:
        RUN.book = book_for(options)
    reporters = max(1, runner.worker_count) if isinstance(runner, MasterRunner) else 1
    if RUN.book.add(window, reporters) and options.stop_when_stable:
        print(f"loadtest: stable after {len(RUN.book.windows)} window(s) of {options.window_s:g} s", flush=True)
        gevent.spawn_later(0, runner.quit)


RUN = Run()
MONITOR: list[MonitorSender] = []  # one per process, started with the first user that needs it


def monitor_sender(options) -> MonitorSender | None:
    if options.monitor_url and not MONITOR:
        MONITOR.append(MonitorSender(options.monitor_url, monitor_token(options.monitor_token_file or None)))
    return MONITOR[0] if MONITOR else None


@events.quitting.add_listener
def close_monitor(environment, **_kwargs):
    for sender in MONITOR:
        sender.close(wait_s=2.0)
        if sender.dropped:
            print(f"loadtest: monitor: {sender.dropped} record(s) dropped, {sender.sent} sent", flush=True)


TRACING: list = []  # this process's TracerProvider (None: tracing not configured), once set up


@events.test_start.add_listener
def configure_tracing(environment, **_kwargs):
    """A TracerProvider per process from the standard variables; --trace-share samples by trace id. At
    test start, not init: a `--worker` process gets the master's options only with the spawn message."""
    if TRACING or environment.parsed_options is None:
        return
    share = environment.parsed_options.trace_share
    if share > 0:
        os.environ.update(OTEL_TRACES_SAMPLER="traceidratio", OTEL_TRACES_SAMPLER_ARG=str(share))
        os.environ.setdefault("OTEL_TRACES_EXPORTER", "otlp")
        os.environ.setdefault("OTEL_SERVICE_NAME", "histoserve-loadtest")
    try:
        provider = tracing.configure_tracing_from_environment()
    except TelemetryConfigError as error:  # nothing can be measured as asked: exit 2, as for a missing model
        print(f"loadtest: error: {error}", flush=True)
        environment.process_exit_code = 2
        environment.runner.quit()
        return
    TRACING.append(provider)  # None too: configured once per process


@events.quitting.add_listener
def flush_traces(environment, **_kwargs):
    for provider in TRACING:
        if provider is not None:
            provider.shutdown()  # exports the spans still queued


@events.init.add_listener
def receive_windows(environment, **_kwargs):
    if isinstance(environment.runner, MasterRunner):
        environment.runner.register_message(
            "histoserve_window", lambda msg, **_: book_window(environment, Window.from_message(msg.data)))


@events.test_start.add_listener
def start_measuring(environment, **_kwargs):
    RUN.start(environment)


@events.spawning_complete.add_listener
def warm_up_over(user_count, **_kwargs):
    """Measure from the first window that begins once every user is running."""
    if RUN.book is not None and RUN.book.measuring_from is None:
        RUN.book.measuring_from = time.time()


@events.test_stop.add_listener
def count_workers_at_the_end(environment, **_kwargs):
    """On the master, before workers are told to quit: how many of the expected ones are still there
    (a worker that quit, crashed or stopped sending heartbeats is gone or marked missing)."""
    runner = environment.runner
    RUN.stop(environment)
    if isinstance(runner, MasterRunner):
        present = len(runner.clients.all) - len(runner.clients.missing)
        environment.histoserve_lost_workers = max(0, environment.parsed_options.expect_workers - present)


def run_summary(environment) -> dict:
    """Locust's totals, and from the HDR windows the latencies at µs resolution, late share and
    wrong answers of the measured windows (every window, for the record)."""
    options, total, book = environment.parsed_options, environment.stats.total, RUN.book or book_for(environment.parsed_options)
    summary = {
        "mode": "open loop" if options.arrival_rate > 0 else "closed loop",
        "offered_per_s": options.arrival_rate or None,
        "users": options.num_users,
        "requests": total.num_requests,
        "failures": total.num_failures,
        "requests_per_second": total.total_rps,
        "p50_ms": total.get_response_time_percentile(0.5) if total.num_requests else 0.0,
        "p99_ms": total.get_response_time_percentile(0.99) if total.num_requests else 0.0,
        "average_ms": total.avg_response_time,
        "stable": book.stable_at is not None,
        "windows": [w.summary() for w in book.windows],
    }
    measured = book.measured(options.stop_when_stable)
    if measured:
        totals = merged(measured)
        summary["measured"] = totals.summary()
        summary["p50_ms"] = summary["measured"]["response_p50_ms"] or 0.0
        summary["p99_ms"] = summary["measured"]["response_p99_ms"] or 0.0
    return summary


@events.quitting.add_listener
def summarize_and_judge(environment, **_kwargs):
    """Write the final totals to PREFIX_summary.json (Locust's --csv files are rewritten once a
    second and miss the last second of a run) and --summary-json, and apply the thresholds
    (loadtest/judgement.py)."""
    if isinstance(environment.runner, WorkerRunner):
        return
    options = environment.parsed_options
    summary = run_summary(environment)
    invalid = invalid_reasons(RunFacts(
        requests=environment.stats.total.num_requests, arrival_rate=options.arrival_rate,
        lost_workers=getattr(environment, "histoserve_lost_workers", 0), expected_workers=options.expect_workers,
        measured=summary.get("measured"), window_s=options.window_s, late_ms=options.late_ms,
        max_late_share=options.max_late_share))
    summary["invalid"] = [reason.to_dict() for reason in invalid]
    for target in (f"{options.csv_prefix}_summary.json" if getattr(options, "csv_prefix", None) else "", options.summary_json):
        if target:
            Path(target).write_text(json.dumps(summary, indent=2))
    if (measured := summary.get("measured")) and options.arrival_rate > 0:
        print(f"loadtest: offered {options.arrival_rate:g} req/s, completed {measured['completed_per_s']:.1f}/s; "
              f"response p50 {measured['response_p50_ms']:.1f} ms p99 {measured['response_p99_ms']:.1f} ms; "
              f"service p50 {measured['service_p50_ms']:.1f} ms p99 {measured['service_p99_ms']:.1f} ms; "
              f"late {measured['late_share']:.1%}; {'stable' if summary['stable'] else 'NOT stable'}", flush=True)
    thresholds = Thresholds(options.fail_p99_ms, options.fail_ratio)
    failed = [] if invalid else threshold_failures(thresholds, summary["p99_ms"], environment.stats.total.fail_ratio)
    if invalid:
        print(f"loadtest: INVALID RUN: {'; '.join(reason.message for reason in invalid)}", flush=True)
    elif failed:
        print(f"loadtest: FAILED: {'; '.join(failed)}", flush=True)
    elif thresholds.set:
        print("loadtest: passed the thresholds", flush=True)
    environment.process_exit_code = exit_code(environment.process_exit_code, invalid, failed, thresholds)


@events.quit.add_listener
def exit_without_finalizers(exit_code, **_kwargs):
    """tritonclient closes its gRPC channel again in __del__, and under gevent that close can block
    forever while the interpreter shuts down (seen about one run in five). Locust fires `quit` after
    its reports are printed; the CSV files are closed next, then sys.exit runs the atexit handlers,
    this one first: leave there, with Locust's exit code, before any finalizer runs."""

    def leave():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)

    atexit.register(leave)


class TritonGrpcUser(User):
    wait_time = constant(0)  # closed loop: the next request as soon as one returns; open loop: the schedule's

    def on_start(self):
        options = self.environment.parsed_options
        try:
            self.classifier = TritonClassifier(options.triton_url, options.model, tls=tls_from(options))
            self.inputs = load_inputs(options, self.classifier)
            monitor_sender(options)  # a monitor without a writer token is an error before the first request
        except (ClientError, ValueError, OSError) as error:
            # Nothing can be measured: end the whole run with a non-zero exit code, not a green report.
            print(f"loadtest: error: {error}", flush=True)
            self.environment.process_exit_code = 2
            if self.environment.runner is not None:
                self.environment.runner.quit()
            raise StopUser() from error
        self.batch_size = max(1, min(options.batch_size, self.classifier.max_batch_size))
        self.name = f"infer {options.model} batch={self.batch_size}"

    def on_stop(self):
        if hasattr(self, "classifier"):
            self.classifier.close()

    def batch(self, indices: list[int]) -> np.ndarray:
        if not self.environment.parsed_options.decode_per_request:
            return self.inputs.arrays[indices]
        pool = gevent.get_hub().threadpool  # Pillow releases the GIL: decoding does not stall the other users
        return np.stack([pool.apply(preprocess_file, (self.inputs.paths[i], self.classifier.spec)) for i in indices])

    @task
    def infer(self):
        intended = RUN.next_send(self.environment) if RUN.loop.schedule else None
        if intended is not None and (wait := intended - time.perf_counter()) > 0:
            gevent.sleep(wait)
        indices = random.sample(range(len(self.inputs.paths)), k=min(self.batch_size, len(self.inputs.paths)))
        started, started_wall = time.perf_counter(), time.time()
        first = intended if intended is not None else started  # response latency counts from here
        sending = RUN.loop.clock.at(started_wall)
        sending.sent += 1
        sending.late += (started - first) * 1000.0 > self.environment.parsed_options.late_ms
        exception, sent, trace_id = None, started, None
        try:
            with tracing.classify_span(self.classifier.model, [self.inputs.paths[i] for i in indices]) as span:
                span.set_attribute("histoserve.batch_size", len(indices))
                batch = self.batch(indices)
                sent = time.perf_counter()  # service latency counts from here (after decoding, when per request)
                answers, version = self.classifier.infer_versioned(batch, top_k=1)
                trace_id = tracing.trace_id_of(span)
            wrong = [(i, row[0]) for i, row in zip(indices, answers, strict=True) if row[0].index not in self.inputs.accepted[i]]
            if wrong:
                i, answer = wrong[0]
                raise WrongPrediction(f"{len(wrong)} wrong answer(s): {self.inputs.paths[i]} got class {answer.index}, "
                                      f"expected {sorted(self.inputs.accepted[i])}")
        except Exception as error:  # every failure must reach Locust's statistics, whatever its type
            exception = error
        done = time.perf_counter()
        if exception is None and (monitor := monitor_sender(self.environment.parsed_options)) is not None:
            monitor.submit(records_for(self.classifier.model, version, batch, [row[0].index for row in answers],
                                       [row[0].score for row in answers], trace_id))
        completing = RUN.loop.clock.at(time.time())
        if exception is None:
            completing.record(done - sent, done - first)
        else:
            completing.failures += 1
            completing.mismatches += isinstance(exception, WrongPrediction)
        self.environment.events.request.fire(
            request_type="grpc",
            name=self.name,
            response_time=(done - first) * 1000.0,
            response_length=len(indices),
            exception=exception,
            context={"batch_size": len(indices)},
        )
