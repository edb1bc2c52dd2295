import csv

from loadtest.report import plot_history, read_summary
from tests.conftest import MODEL, run_cli


def test_headless_locust_run_against_triton_has_no_failures(server, digits_root, tmp_path):
    prefix = tmp_path / "locust"
    result = run_cli("locust", "-f", "loadtest/locustfile.py", "--headless", "--users", 4, "--spawn-rate", 4,
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
    result = run_cli("locust", "-f", "loadtest/locustfile.py", "--headless", "--users", 1, "--spawn-rate", 1,
                     "--run-time", "3s", "--only-summary", "--triton-url", server.grpc_url, "--model", "absent",
                     "--images", digits_root / "test", check=False, timeout=120)
    assert result.returncode == 2
    assert "loadtest: error: model 'absent'" in result.stdout + result.stderr


def test_latency_threshold_turns_a_slow_run_into_exit_code_3(server, digits_root, tmp_path):
    result = run_cli("locust", "-f", "loadtest/locustfile.py", "--headless", "--users", 2, "--spawn-rate", 2,
                     "--run-time", "3s", "--only-summary", "--triton-url", server.grpc_url, "--model", MODEL,
                     "--images", digits_root / "test", "--fail-p99-ms", 0.001, "--fail-ratio", 0.5,
                     check=False, timeout=120)
    assert result.returncode == 3
    assert "loadtest: FAILED: p99" in result.stdout + result.stderr
