import csv
import os
import subprocess
import sys
import time
from collections.abc import Callable

from histoserve.loadtest.report import plot_history, read_summary
from histoserve.serve.triton_flags import free_ports
from tests.conftest import MODEL, ROOT, run_cli, triton_requests, wait_for_requests


def test_headless_locust_run_against_triton_has_no_failures(server, digits_root, tmp_path):
    prefix = tmp_path / "locust"
    result = run_cli("-m", "histoserve.loadtest", "locust", "--headless", "--users", 4, "--spawn-rate", 4,
                     "--run-time", "6s", "--only-summary", "--triton-url", server.grpc_url, "--model", MODEL,
                     "--images", digits_root / "test", "--batch-size", 2,
                     "--csv", prefix, "--html", tmp_path / "locust.html", check=False, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(prefix)
    assert summary.requests > 20 and summary.failures == 0
    assert 0 < summary.p50_ms <= summary.p99_ms
    with open(f"{prefix}_stats.csv", newline="") as handle:
        names = [row["Name"] for row in csv.DictReader(handle)]
    assert f"infer {MODEL} batch=2" in names
    assert plot_history(prefix).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "locust.html").stat().st_size > 0


def test_locust_run_fails_loudly_when_the_model_is_missing(server, digits_root):
    result = run_cli("-m", "histoserve.loadtest", "locust", "--headless", "--users", 1, "--spawn-rate", 1,
                     "--run-time", "3s", "--only-summary", "--triton-url", server.grpc_url, "--model", "absent",
                     "--images", digits_root / "test", check=False, timeout=120)
    assert result.returncode == 2
    assert "loadtest: error: model 'absent'" in result.stdout + result.stderr


def test_latency_threshold_turns_a_slow_run_into_exit_code_3(server, digits_root, tmp_path):
    result = run_cli("-m", "histoserve.loadtest", "locust", "--headless", "--users", 2, "--spawn-rate", 2,
                     "--run-time", "3s", "--only-summary", "--triton-url", server.grpc_url, "--model", MODEL,
                     "--images", digits_root / "test", "--fail-p99-ms", 0.001, "--fail-ratio", 0.5,
                     check=False, timeout=120)
    assert result.returncode == 3
    assert "loadtest: FAILED: p99" in result.stdout + result.stderr


def run_distributed(*master_args, workers: int = 1, kill_a_worker_mid_run: Callable[[], None] | None = None) -> tuple[int, str]:
    """A headless Locust master and its worker processes on this machine; returns the master's exit
    code and output. `kill_a_worker_mid_run` returns once the run is under way; then a worker dies."""
    port = free_ports().http
    locust = [sys.executable, "-m", "histoserve.loadtest", "locust"]
    master = subprocess.Popen([*locust, "--master", "--headless", "--master-bind-port", str(port), *map(str, master_args)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = [subprocess.Popen([*locust, "--worker", "--master-port", str(port)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(workers)]
    try:
        if kill_a_worker_mid_run is not None:
            kill_a_worker_mid_run()
            started[0].kill()  # SIGKILL: no goodbye, only missing heartbeats
        output = master.communicate(timeout=120)[0]
    finally:
        for worker in started:
            worker.kill()
            worker.wait()
    return master.returncode, output


def test_a_distributed_run_that_sends_nothing_fails(server):
    """The master alone never reads images; a worker that cannot quits at on_start, and the master
    ends with zero requests: exit 4, never a green 0/0."""
    code, output = run_distributed("--expect-workers", 1, "--users", 2, "--spawn-rate", 2, "--run-time", "8s",
                                   "--only-summary", "--triton-url", server.grpc_url, "--model", MODEL,
                                   "--images", "no/such/folder", "--fail-ratio", 0.01)
    assert code == 4, output[-3000:]
    assert "loadtest: INVALID RUN: no request was sent" in output


def test_a_worker_lost_during_the_run_fails_it(server, digits_root):
    before = triton_requests(server)
    code, output = run_distributed("--expect-workers", 2, "--users", 2, "--spawn-rate", 2, "--run-time", "12s",
                                   "--only-summary", "--triton-url", server.grpc_url, "--model", MODEL,
                                   "--images", digits_root / "test", "--fail-ratio", 0.01,
                                   workers=2, kill_a_worker_mid_run=lambda: wait_for_requests(server, 50, before))
    assert code == 4, output[-3000:]
    assert "loadtest: INVALID RUN: 1 of 2 worker(s) lost during the run" in output


def test_fewer_workers_than_expected_within_the_wait_fails(server, digits_root):
    code, output = run_distributed("--expect-workers", 2, "--expect-workers-max-wait", 3, "--users", 2,
                                   "--spawn-rate", 2, "--run-time", "5s", "--triton-url", server.grpc_url,
                                   "--model", MODEL, "--images", digits_root / "test")
    assert code != 0, output[-3000:]
    assert "Gave up waiting for workers to connect" in output


def test_a_traced_share_of_requests_is_traced_from_locust_through_triton(traced_server, otlp_receiver, digits_root, tmp_path):
    """--trace-share 0.5: about half the requests get a span (and only those send traceparent), and
    Triton traces those only: the rest carry no context and its 1-in-1000 rate takes none of them."""
    from histoserve.client.tracing import CLASSIFY_SPAN, RPC_SPAN

    before = len(otlp_receiver.spans())
    environment = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint, "OTEL_SERVICE_NAME": "locust-tracing"}
    result = run_cli("-m", "histoserve.loadtest", "locust", "--headless", "--users", 2, "--spawn-rate", 2,
                     "--arrival-rate", 20, "--window-s", 1, "--max-late-share", 1, "--run-time", "4s", "--only-summary",
                     "--triton-url", traced_server.grpc_url,
                     "--model", MODEL,
                     "--images", digits_root / "test", "--max-images", 32, "--trace-share", 0.5, "--csv", tmp_path / "locust",
                     env=environment, check=False, timeout=120)
    assert result.returncode == 0, (result.stdout + result.stderr)[-1500:]
    requests = read_summary(tmp_path / "locust").requests
    spans = otlp_receiver.spans()[before:]
    traced = {s.span_id for s in spans if s.name == RPC_SPAN and s.resource.get("service.name") == "locust-tracing"}
    assert 0 < len(traced) < requests, f"{len(traced)} of {requests} requests traced"
    assert all(s.attributes["histoserve.model"] == MODEL for s in spans if s.name == CLASSIFY_SPAN)
    time.sleep(2.0)  # Triton exports 0.2 s after a span ends
    triton = [s.parent_span_id for s in otlp_receiver.spans()[before:] if s.name == "InferRequest"]
    assert set(triton) <= traced, "Triton traced a request that the sampler left out"
    # About 1 traced request in 10 gets no Triton trace here (measured: 32 to 34 of 36 or 37): likely the
    # local 2.51's race between concurrently traced requests (server PR #8144, fixed in 25.04; it also
    # crashes 2.51 at higher rates, docs/kubernetes/observability.md, "Tracing"), so the test asks for most, not all.
    assert len(set(triton)) >= 0.8 * len(traced), f"Triton traced {len(set(triton))} of {len(traced)} sampled requests"


def test_an_encoded_model_is_refused_by_name_before_any_timed_request(traced_server, digits_root):
    result = run_cli("-m", "histoserve.loadtest", "locust", "--headless", "--users", 1, "--spawn-rate", 1,
                     "--run-time", "3s", "--only-summary", "--triton-url", traced_server.grpc_url, "--model", f"{MODEL}-encoded",
                     "--images", digits_root / "test", check=False, timeout=120)
    assert result.returncode == 2
    assert "loadtest: error: the model is an encoded model" in result.stdout + result.stderr
