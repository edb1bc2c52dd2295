"""Locust load test for a histoserve model on Triton over gRPC.

    locust -f loadtest/locustfile.py --headless --users 8 --spawn-rate 8 --run-time 30s \
        --triton-url localhost:8001 --model digits --images data/digits/test \
        --csv reports/locust --html reports/locust.html

Each simulated user holds its own gRPC channel and sends real images, preprocessed once per process
with the client's preprocessing (the server's contract), as uint8 batches of --batch-size.

Exit codes: 0 passed; 1 Locust's own failure (any failed request without --fail-ratio, or workers
missing after --expect-workers-max-wait); 2 nothing can be measured (model missing, no readable
image); 3 a threshold failed (--fail-p99-ms, --fail-ratio); 4 the run is not valid: no request was
sent, or a worker was lost during the run (fewer than --expect-workers were still there at the end).
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
from functools import lru_cache  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from locust import User, constant, events, task  # noqa: E402
from locust.exception import StopUser  # noqa: E402
from locust.runners import MasterRunner, WorkerRunner  # noqa: E402

from histoserve.client.classifier import ClientError, TritonClassifier  # noqa: E402
from histoserve.client.preprocessing import ImageLoadError, PreprocessSpec, find_images, preprocess_file  # noqa: E402

MAX_IMAGES = 512


@events.init_command_line_parser.add_listener
def add_arguments(parser):
    group = parser.add_argument_group("histoserve", "Triton model under test")
    group.add_argument("--triton-url", default="localhost:8001", env_var="HISTOSERVE_TRITON_URL",
                       help="Triton gRPC address")
    group.add_argument("--model", default="digits", env_var="HISTOSERVE_MODEL", help="model name")
    group.add_argument("--images", default="data/digits/test", env_var="HISTOSERVE_IMAGES",
                       help="folder of images to send (searched recursively)")
    group.add_argument("--batch-size", type=int, default=1, env_var="HISTOSERVE_BATCH_SIZE",
                       help="images per request")
    group.add_argument("--fail-p99-ms", type=float, default=0.0, env_var="HISTOSERVE_FAIL_P99_MS",
                       help="exit with code 3 when the p99 latency is above this (0: no limit)")
    group.add_argument("--fail-ratio", type=float, default=-1.0, env_var="HISTOSERVE_FAIL_RATIO",
                       help="exit with code 3 when the failed share of requests is above this (-1: Locust's "
                            "own rule, any failure exits 1)")


@lru_cache(maxsize=4)
def load_images(folder: str, spec: PreprocessSpec) -> np.ndarray:
    """Preprocess up to MAX_IMAGES images once per process; bad files are skipped, not fatal."""
    paths = find_images(folder)
    arrays = []
    for path in paths[:MAX_IMAGES]:
        try:
            arrays.append(preprocess_file(path, spec))
        except ImageLoadError as error:
            print(f"loadtest: skipping {error}")
    if not arrays:
        raise ValueError(f"--images {folder}: no readable images")
    return np.stack(arrays)


@events.test_stop.add_listener
def count_workers_at_the_end(environment, **_kwargs):
    """On the master, before workers are told to quit: how many of the expected ones are still there
    (a worker that quit, crashed or stopped sending heartbeats is gone or marked missing)."""
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        present = len(runner.clients.all) - len(runner.clients.missing)
        environment.histoserve_lost_workers = max(0, environment.parsed_options.expect_workers - present)


@events.quitting.add_listener
def summarize_and_judge(environment, **_kwargs):
    """Write the final totals to PREFIX_summary.json (Locust's --csv files are rewritten once a
    second and miss the last second of a run) and apply the pass/fail thresholds."""
    if isinstance(environment.runner, WorkerRunner):
        return
    options, total = environment.parsed_options, environment.stats.total
    summary = {
        "requests": total.num_requests,
        "failures": total.num_failures,
        "requests_per_second": total.total_rps,
        "p50_ms": total.get_response_time_percentile(0.5) if total.num_requests else 0.0,
        "p99_ms": total.get_response_time_percentile(0.99) if total.num_requests else 0.0,
        "average_ms": total.avg_response_time,
    }
    if getattr(options, "csv_prefix", None):
        Path(f"{options.csv_prefix}_summary.json").write_text(json.dumps(summary, indent=2))
    invalid = []
    if total.num_requests == 0:
        invalid.append("no request was sent")
    if lost := getattr(environment, "histoserve_lost_workers", 0):
        invalid.append(f"{lost} of {options.expect_workers} worker(s) lost during the run")
    if invalid:
        print(f"loadtest: INVALID RUN: {'; '.join(invalid)}", flush=True)
        if environment.process_exit_code != 2:  # "nothing can be measured" already says more
            environment.process_exit_code = 4
        return
    verdicts = []
    if options.fail_p99_ms > 0 and summary["p99_ms"] > options.fail_p99_ms:
        verdicts.append(f"p99 {summary['p99_ms']:.0f} ms > --fail-p99-ms {options.fail_p99_ms:.0f}")
    if options.fail_ratio >= 0 and total.fail_ratio > options.fail_ratio:
        verdicts.append(f"failure ratio {total.fail_ratio:.4f} > --fail-ratio {options.fail_ratio}")
    if verdicts:
        print(f"loadtest: FAILED: {'; '.join(verdicts)}", flush=True)
        environment.process_exit_code = 3
    elif options.fail_p99_ms > 0 or options.fail_ratio >= 0:
        print("loadtest: passed the thresholds", flush=True)
        if options.fail_ratio >= 0:  # failures within the allowed ratio must not fail the run
            environment.process_exit_code = 0


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
    wait_time = constant(0)  # closed loop: each user sends its next request as soon as one returns

    def on_start(self):
        options = self.environment.parsed_options
        try:
            self.classifier = TritonClassifier(options.triton_url, options.model)
            self.images = load_images(options.images, self.classifier.spec)
        except (ClientError, ValueError) as error:
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

    @task
    def infer(self):
        indices = random.sample(range(len(self.images)), k=min(self.batch_size, len(self.images)))
        batch = self.images[indices]
        started = time.perf_counter()
        exception = None
        try:
            self.classifier.infer(batch, top_k=1)
        except Exception as error:  # every failure must reach Locust's statistics, whatever its type
            exception = error
        self.environment.events.request.fire(
            request_type="grpc",
            name=self.name,
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=batch.nbytes,
            exception=exception,
            context={"batch_size": len(batch)},
        )
