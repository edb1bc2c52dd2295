"""Open-loop Locust runs and the SLO sweep against a real Triton (short runs; no test asserts a speed)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from histoserve.client.classifier import TritonClassifier
from histoserve.loadtest.expectations import expected_predictions, request_images, write_expected
from tests.conftest import MODEL, ROOT, run_cli, triton_requests, wait_for_requests

LOCUST = [str(Path(sys.executable).parent / "locust"), "-f", str(ROOT / "loadtest" / "locustfile.py")]


def locust_args(server, images, summary, *extra):
    return [*LOCUST, "--headless", "--only-summary", "--triton-url", server.grpc_url, "--model", MODEL,
            "--images", str(images), "--max-images", "64", "--window-s", "1", "--summary-json", str(summary),
            *map(str, extra)]


def test_open_loop_run_offers_the_rate_and_reports_both_latencies(server, digits_root, tmp_path):
    """--late-ms 50: on 2 shared cores the gevent loop wakes a few ms late now and then; punctuality is
    not what this test is about (the stalled-server test below is)."""
    summary_file = tmp_path / "open.json"
    result = subprocess.run(locust_args(server, digits_root / "test", summary_file, "--users", 8, "--spawn-rate", 8,
                                        "--run-time", "7s", "--arrival-rate", 30, "--fail-ratio", 0, "--late-ms", 50),
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(summary_file.read_text())
    measured = summary["measured"]
    assert summary["mode"] == "open loop" and summary["invalid"] == []
    assert measured["sent"] == pytest.approx(30 * measured["seconds"], rel=0.35)  # Poisson: the schedule, not the server, sets it
    assert measured["failures"] == measured["mismatches"] == 0
    assert 0 < measured["service_p50_ms"] <= measured["response_p50_ms"]
    assert measured["service_p99_ms"] <= measured["response_p99_ms"]
    assert "loadtest: offered 30 req/s" in result.stdout + result.stderr


def test_a_stalled_server_shows_in_response_latency_not_in_service_latency(server, digits_root, tmp_path):
    """The server is frozen (SIGSTOP) for 2 s mid-run. The 4 users are stuck, so the requests meant
    for those 2 s go out late: from when they were sent they look fast, from when they were meant
    to be sent they waited. The run is marked invalid: the generator could not keep the rate. (The
    session's server: resumed at once, and the run has had every answer when the test ends.)"""
    summary_file = tmp_path / "stalled.json"
    warmed_up = triton_requests(server)  # Triton counts its own warm-up requests too
    process = subprocess.Popen(locust_args(server, digits_root / "test", summary_file, "--users", 4, "--spawn-rate", 4,
                                           "--run-time", "9s", "--arrival-rate", 25),
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # about 1.5 s into the run, past Locust's warm-up: a busy machine starts Locust late
    try:
        wait_for_requests(server, 40, since=warmed_up)
        os.killpg(server.process.pid, signal.SIGSTOP)
        time.sleep(2)
    finally:
        os.killpg(server.process.pid, signal.SIGCONT)  # whatever happens: the next tests share it
    output = process.communicate(timeout=120)[0]
    summary = json.loads(summary_file.read_text())
    measured = summary["measured"]
    assert process.returncode == 4, output[-3000:]
    assert "the generator could not keep the offered 25 req/s" in output
    assert measured["late_share"] > 0.05
    assert measured["response_p90_ms"] > 500, measured
    assert measured["service_p90_ms"] < measured["response_p90_ms"] / 3, measured
    assert measured["response_max_ms"] >= 1500


def test_a_wrong_answer_is_a_failed_request(server, digits_root, tmp_path):
    """Expected predictions that disagree with the model's own (shifted by one class): every answer
    is then wrong, and each one is a failed request, counted as a mismatch."""
    with TritonClassifier(server.grpc_url, MODEL) as classifier:
        paths, images = request_images(str(digits_root / "test"), classifier.spec, 64)
        right = expected_predictions(classifier, images)
    expected = tmp_path / "expected.json"
    write_expected(expected, paths, [frozenset({(min(a) + 1) % 10}) if len(a) == 1 else frozenset() for a in right])
    summary_file = tmp_path / "wrong.json"
    result = subprocess.run(locust_args(server, digits_root / "test", summary_file, "--users", 2, "--spawn-rate", 2,
                                        "--run-time", "4s", "--expected", expected, "--fail-ratio", 0.5),
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    summary = json.loads(summary_file.read_text())
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
    assert summary["failures"] == summary["requests"] > 0
    assert summary["measured"]["mismatches"] == summary["measured"]["failures"] > 0
    assert "WrongPrediction" in result.stdout + result.stderr


def test_decoding_per_request_sends_real_files(server, digits_root, tmp_path):
    summary_file = tmp_path / "decode.json"
    result = subprocess.run(locust_args(server, digits_root / "test", summary_file, "--users", 2, "--spawn-rate", 2,
                                        "--run-time", "4s", "--batch-size", 4, "--decode-per-request", "--fail-ratio", 0),
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads(summary_file.read_text())
    assert summary["requests"] > 0 and summary["failures"] == 0


def test_open_loop_rate_is_shared_by_worker_processes(server, digits_root, tmp_path):
    summary_file = tmp_path / "processes.json"
    result = subprocess.run(locust_args(server, digits_root / "test", summary_file, "--users", 8, "--spawn-rate", 8,
                                        "--run-time", "8s", "--arrival-rate", 30, "--processes", 2, "--expect-workers", 2,
                                        "--fail-ratio", 0, "--late-ms", 50),
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(summary_file.read_text())
    measured = summary["measured"]
    # both workers' windows were merged: together, not each, they offered 30 req/s
    assert measured["sent"] == pytest.approx(30 * measured["seconds"], rel=0.35)


@pytest.mark.parametrize("slo_ms, code", [(1000, 0), (0.001, 3)])
def test_sweep_finds_capacity_under_the_slo(server, digits_root, tmp_path, slo_ms, code):
    out = tmp_path / "sweep"
    result = run_cli("-m", "histoserve.loadtest", "sweep", "--url", server.grpc_url, "--model", MODEL,
                     "--images", digits_root / "test", "--slo-p99-ms", slo_ms, "--rates", "10,20", "--refine", 0,
                     "--window-s", 1, "--stable-windows", 2, "--max-windows", 4, "--concurrency", 2,
                     "--metrics-url", f"http://127.0.0.1:{server.ports.metrics}/metrics", "--out", out,
                     "--admin-key-file", server.admin_key_file, check=False, timeout=300)
    assert result.returncode == code, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "sweep.json").read_text())
    assert [s["offered"] for s in report["steps"]] == [10, 20]
    assert report["capacity_per_s"] == (20 if code == 0 else 0)
    step = report["steps"][0]
    assert step["triton"]["requests"] > 0 and step["triton"]["average_batch"] >= 1
    assert step["triton"]["metrics"]["nv_inference_request_success"] == step["triton"]["requests"]
    cross = report["cross_checks"]
    assert cross["locust_closed_loop_per_s"] > 0 and cross["direct_closed_loop_per_s"] > 0
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "cross-check: Locust ÷ direct" in result.stdout


def test_the_sweep_stops_before_any_load_when_triton_refuses_its_statistics(server, digits_root, tmp_path):
    """Triton's statistics are an admin API: without the key the sweep cannot say where the time goes,
    and says so (exit 2) before it sends any load."""
    before = triton_requests(server)
    result = run_cli("-m", "histoserve.loadtest", "sweep", "--url", server.grpc_url, "--model", MODEL, "--images", digits_root / "test",
                     "--max-images", 16, "--slo-p99-ms", 1000, "--rates", 10, "--out", tmp_path / "sweep",
                     check=False, timeout=120, env={**os.environ, "HISTOSERVE_ADMIN_KEY": ""})
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "refused its statistics" in result.stderr and "--admin-key-file" in result.stderr
    assert triton_requests(server) - before <= 16  # the expected answers only: no load was sent
