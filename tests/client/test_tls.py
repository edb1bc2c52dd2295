"""TLS and mutual TLS between `python -m histoserve.client classify` and the real Triton (`python -m histoserve.serve`'s
TritonServer with --grpc-use-ssl), with certificates made in the test."""

import json
import time

import pytest

from histoserve.serve.triton_flags import GrpcTls
from tests.conftest import MODEL, run_cli, started_triton


def classify(url, files, *tls):
    started = time.monotonic()
    result = run_cli("-m", "histoserve.client", "classify", *files, "--url", url, "--model", MODEL, "--json", "--deadline-s", 20,
                     *tls, check=False, timeout=120)
    return result, time.monotonic() - started


@pytest.fixture(scope="module")
def tls_server(repository, pki):
    """TLS without client certificates; mutual TLS is the session's `mtls_server` (tests/conftest.py)."""
    key, certificate = pki["server"]
    with started_triton(repository, grpc_tls=GrpcTls(certificate, key)) as server:
        yield server


def test_a_tls_client_classifies_over_tls(tls_server, pki, test_files):
    result, _ = classify(tls_server.grpc_url, test_files[:3], "--ssl", "--ssl-root-certificates", pki["ca"])
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["error"] for line in result.stdout.splitlines()] == [None] * 3


def test_a_plaintext_client_against_tls_gets_a_clear_error_not_a_hang(tls_server, test_files):
    result, took = classify(tls_server.grpc_url, test_files[:1])
    assert result.returncode == 2
    assert "cannot reach Triton" in result.stderr and "pass --ssl" in result.stderr
    assert took < 15, f"{took:.0f} s"


def test_a_server_certificate_from_an_unknown_authority_is_refused(tls_server, pki, test_files):
    result, took = classify(tls_server.grpc_url, test_files[:1], "--ssl", "--ssl-root-certificates", pki["other_ca"])
    assert result.returncode == 2 and "certificates match" in result.stderr
    assert took < 15


def test_mutual_tls_admits_a_client_certificate_from_its_authority_only(mtls_server, pki, test_files):
    ca = ["--ssl", "--ssl-root-certificates", pki["ca"]]
    key, certificate = pki["client"]
    admitted, _ = classify(mtls_server.grpc_url, test_files[:2], *ca, "--ssl-private-key", key, "--ssl-certificate-chain", certificate)
    assert admitted.returncode == 0, admitted.stderr
    assert len(admitted.stdout.splitlines()) == 2
    anonymous, took = classify(mtls_server.grpc_url, test_files[:1], *ca)
    assert anonymous.returncode == 2 and "cannot reach Triton" in anonymous.stderr and took < 15
    key, certificate = pki["stranger"]
    stranger, took = classify(mtls_server.grpc_url, test_files[:1], *ca, "--ssl-private-key", key, "--ssl-certificate-chain", certificate)
    assert stranger.returncode == 2 and took < 15


def test_half_a_client_identity_is_refused_before_connecting(tls_server, pki, test_files):
    key, _ = pki["client"]
    result, _ = classify(tls_server.grpc_url, test_files[:1], "--ssl", "--ssl-private-key", key)
    assert result.returncode == 2 and "mutual TLS needs both --ssl-private-key and --ssl-certificate-chain" in result.stderr


def test_the_load_test_speaks_mutual_tls_too(mtls_server, pki, digits_root):
    """The Locust user takes the same TLS options; without a client certificate it cannot measure (exit 2)."""
    key, certificate = pki["client"]
    common = ["-m", "histoserve.loadtest", "locust", "--headless", "--only-summary", "--users", 2, "--spawn-rate", 2,
              "--run-time", "3s", "--triton-url", mtls_server.grpc_url, "--model", MODEL, "--images", digits_root / "test",
              "--max-images", 32, "--ssl", "--ssl-root-certificates", pki["ca"]]
    admitted = run_cli(*common, "--ssl-private-key", key, "--ssl-certificate-chain", certificate, "--fail-ratio", 0,
                       check=False, timeout=120)
    assert admitted.returncode == 0, admitted.stdout[-2000:] + admitted.stderr[-2000:]
    anonymous = run_cli(*common, check=False, timeout=120)
    assert anonymous.returncode == 2 and "cannot reach Triton" in anonymous.stdout + anonymous.stderr


def test_the_sweep_speaks_mutual_tls_too(mtls_server, pki, digits_root, tmp_path):
    """Every call of the sweep (expectations, Locust steps, the direct loop, Triton's statistics) goes
    over mutual TLS; without a client certificate nothing can be measured (exit 2)."""
    key, certificate = pki["client"]
    common = ["-m", "histoserve.loadtest", "sweep", "--url", mtls_server.grpc_url, "--model", MODEL, "--images", digits_root / "test",
              "--max-images", 32, "--slo-p99-ms", 1000, "--rates", 10, "--refine", 0, "--window-s", 1,
              "--stable-windows", 2, "--max-windows", 3, "--concurrency", 2, "--out", tmp_path / "sweep",
              "--ssl", "--ssl-root-certificates", pki["ca"], "--admin-key-file", mtls_server.admin_key_file]
    admitted = run_cli(*common, "--ssl-private-key", key, "--ssl-certificate-chain", certificate, check=False, timeout=300)
    assert admitted.returncode == 0, admitted.stdout[-3000:] + admitted.stderr[-3000:]
    report = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert report["capacity_per_s"] == 10 and report["steps"][0]["triton"]["requests"] > 0
    assert report["cross_checks"]["direct_closed_loop_per_s"] > 0
    anonymous = run_cli(*common, check=False, timeout=120)
    assert anonymous.returncode == 2, anonymous.stdout[-2000:] + anonymous.stderr[-2000:]
    assert "error:" in anonymous.stderr
