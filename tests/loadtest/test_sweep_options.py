"""`python -m histoserve.loadtest sweep` refuses bad options when the command line is read, before it calls the
server (the URL here points at nothing: any call would fail with another message)."""

import pytest

from tests.conftest import MODEL, run_cli


@pytest.mark.parametrize("options, message", [
    (["--rates", "abc"], "argument --rates: 'abc': not a number: 'abc'"),
    (["--rates", "10,0"], "argument --rates: '0': must be above 0, got 0"),
    (["--slo-p99-ms", "0"], "argument --slo-p99-ms: must be above 0, got 0"),
    (["--concurrency", "0"], "argument --concurrency: must be at least 1, got 0"),
    (["--users", "32", "--max-users", "8"], "--max-users 8 is below --users 32"),
    (["--ssl-root-certificates", "/nonexistent/ca.pem"], "--ssl-root-certificates: no such file: /nonexistent/ca.pem"),
], ids=["rates-text", "rates-zero", "slo", "concurrency", "users", "tls"])
def test_bad_sweep_options_are_refused_before_any_call(digits_root, tmp_path, options, message):
    defaults = {"--slo-p99-ms": "500"}
    given = dict(zip(options[::2], options[1::2], strict=True))
    result = run_cli("-m", "histoserve.loadtest", "sweep", "--url", "127.0.0.1:9", "--model", MODEL, "--images", digits_root / "test",
                     "--out", tmp_path / "sweep", *[x for k, v in {**defaults, **given}.items() for x in (k, v)],
                     check=False, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "cannot reach Triton" not in result.stderr and not (tmp_path / "sweep").exists()


def test_a_missing_image_folder_is_named(tmp_path):
    result = run_cli("-m", "histoserve.loadtest", "sweep", "--model", MODEL, "--images", tmp_path / "none", "--slo-p99-ms", 500,
                     check=False, timeout=60)
    assert result.returncode == 2 and f"argument --images: no such folder: {tmp_path / 'none'}" in result.stderr
