"""`python -m histoserve.client classify` against the session's real Triton."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from histoserve.client.classifier import TritonClassifier
from histoserve.formats.preprocessing import find_images
from tests.conftest import MODEL, ROOT, make_truncated_png, run_cli


def classify(server, *paths, check=False):
    return run_cli("-m", "histoserve.client", "classify", *paths, "--url", server.grpc_url, "--model", MODEL,
                   "--top-k", 3, "--json", check=check)


def rows(result):
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_one_file(server, test_files):
    result = classify(server, test_files[0])
    assert result.returncode == 0, result.stderr
    [row] = rows(result)
    assert row["path"] == str(test_files[0]) and row["error"] is None
    assert len(row["predictions"]) == 3
    scores = [p["score"] for p in row["predictions"]]
    assert scores == sorted(scores, reverse=True) and 0 <= scores[-1] <= scores[0] <= 1
    assert all(p["label"] == str(p["index"]) for p in row["predictions"])  # digits: label i is class i


def test_folder_and_glob(server, digits_root):
    folder = classify(server, digits_root / "test" / "3")
    assert folder.returncode == 0, folder.stderr
    expected = sorted(str(p) for p in (digits_root / "test" / "3").glob("*.png"))
    assert [r["path"] for r in rows(folder)] == expected
    pattern = classify(server, str(digits_root / "test" / "*" / "digit_00*.png"))
    assert pattern.returncode == 0, pattern.stderr
    assert rows(pattern) and all(r["path"].split("/")[-1].startswith("digit_00") for r in rows(pattern))


def test_a_corrupt_file_among_good_ones_gives_one_error_and_all_other_results(server, test_files, tmp_path):
    good = test_files[:20]  # more than max_batch_size, so results span several batches
    for path in good:
        shutil.copy(path, tmp_path / f"{path.parent.name}_{path.name}")
    make_truncated_png(tmp_path / "5_corrupt.png")
    result = classify(server, tmp_path)
    assert result.returncode == 1
    results = rows(result)
    assert len(results) == 21
    errors = [r for r in results if r["error"]]
    assert [e["path"] for e in errors] == [str(tmp_path / "5_corrupt.png")]
    assert "truncated" in errors[0]["error"]
    assert all(len(r["predictions"]) == 3 for r in results if not r["error"])
    assert "1 of 21 file(s) failed" in result.stderr


def test_plain_text_output_and_missing_file(server, test_files, tmp_path):
    result = run_cli("-m", "histoserve.client", "classify", test_files[0], tmp_path / "missing.png",
                     "--url", server.grpc_url, "--model", MODEL, "--top-k", 2, check=False)
    assert result.returncode == 1
    first, second = result.stdout.splitlines()
    assert first.startswith(str(test_files[0]) + "\t") and len(first.split("\t")[1].split(", ")) == 2
    assert second == f"{tmp_path / 'missing.png'}\terror: no such file"


@pytest.mark.parametrize("url, model, message", [
    ("127.0.0.1:9", MODEL, "cannot reach Triton at 127.0.0.1:9"),
    (None, "no_such_model", "no_such_model"),
])
def test_unusable_server_or_model_exits_2_with_a_message(server, test_files, url, model, message):
    result = run_cli("-m", "histoserve.client", "classify", test_files[0], "--url", url or server.grpc_url,
                     "--model", model, check=False)
    assert result.returncode == 2
    assert message in result.stderr


def test_dns_targets_are_accepted(server, test_files):
    """Spreading calls over several servers is tested against two real servers in
    tests/k8s/test_grpc_balancing.py."""
    port = server.grpc_url.rsplit(":", 1)[1]
    result = classify_url(f"dns:///localhost:{port}", test_files[0])
    assert result.returncode == 0, result.stderr
    assert rows(result)[0]["predictions"]


def classify_url(url, *paths):
    return run_cli("-m", "histoserve.client", "classify", *paths, "--url", url, "--model", MODEL, "--json", check=False)


def test_a_classifier_that_cannot_start_closes_its_channel(server, monkeypatch):
    import tritonclient.grpc as grpcclient

    import histoserve.client.classifier as classifier_module
    from histoserve.client.classifier import ClientError, TritonClassifier

    made = []

    class Recorded(grpcclient.InferenceServerClient):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(classifier_module.grpcclient, "InferenceServerClient", Recorded)
    with pytest.raises(ClientError, match="'absent'"):
        TritonClassifier(server.grpc_url, "absent")
    [channel_owner] = made
    with pytest.raises(ValueError, match="closed channel"):  # grpc refuses calls on a closed channel
        channel_owner._client_stub.ServerLive(grpcclient.service_pb2.ServerLiveRequest())


@pytest.mark.parametrize("concurrency, batch_size", [(1, None), (4, 1), (8, 3)])
def test_concurrent_classification_keeps_input_order_and_results(server, test_files, concurrency, batch_size):
    files = test_files[:40]
    extra = ["--concurrency", concurrency, *(["--batch-size", batch_size] if batch_size else [])]
    result = run_cli("-m", "histoserve.client", "classify", *files, "--url", server.grpc_url, "--model", MODEL, "--json", *extra)
    got = rows(result)
    assert [r["path"] for r in got] == [str(f) for f in files]
    reference = rows(classify(server, *files, check=True))
    assert [r["predictions"][0] for r in got] == [r["predictions"][0] for r in reference]


def test_input_is_read_lazily_and_held_in_bounded_batches(server, test_files):
    pulled = 0

    def paths():
        nonlocal pulled
        for path in test_files * 10:  # 2,700 paths; only a window of them may be read ahead
            pulled += 1
            yield path

    with TritonClassifier(server.grpc_url, MODEL) as client:
        results = client.classify_files(paths(), concurrency=2, batch_size=4)
        first = next(results)
        assert first.ok and first.path == str(test_files[0])
        assert pulled <= 2 * 2 * 4 + 4, f"{pulled} paths read before the first result"
        results.close()  # a caller that stops early: pending batches are dropped


def test_output_file_gets_the_lines_and_stdout_stays_empty(server, test_files, tmp_path):
    out = tmp_path / "results.jsonl"
    result = run_cli("-m", "histoserve.client", "classify", *test_files[:5], "--url", server.grpc_url, "--model", MODEL,
                     "--json", "--output", out)
    assert result.stdout == ""
    assert [json.loads(line)["path"] for line in out.read_text().splitlines()] == [str(f) for f in test_files[:5]]


def test_ctrl_c_prints_complete_lines_so_far_and_exits_130_without_a_traceback(server, digits_root):
    command = [sys.executable, "-m", "histoserve.client", "classify", str(digits_root), "--url", server.grpc_url, "--model", MODEL,
               "--json", "--batch-size", "1", "--concurrency", "2"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Interrupt as soon as results flow (a few lines in), not after a fixed sleep: the digits model
    # answers ~1800 batch-1 requests in about a second, so a sleep can outlast the whole run.
    first_lines = [process.stdout.readline() for _ in range(5)]
    process.send_signal(signal.SIGINT)
    rest, stderr = process.stdout.read(), process.stderr.read()  # not communicate(): it skips lines readline() buffered
    process.wait(60)
    lines = [*(line.rstrip("\n") for line in first_lines), *rest.splitlines()]
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted:" in stderr
    expected = [str(p) for p in find_images(digits_root)]
    assert 0 < len(lines) < len(expected)
    assert [json.loads(line)["path"] for line in lines] == expected[: len(lines)]


@pytest.mark.parametrize("options, message", [
    (["--concurrency", "0"], "argument --concurrency: must be at least 1, got 0"),
    (["--batch-size", "-1"], "argument --batch-size: must be at least 1, got -1"),
    (["--top-k", "0"], "argument --top-k: must be at least 1, got 0"),
    (["--deadline-s", "0"], "argument --deadline-s: must be above 0, got 0"),
    (["--output", "{tmp}/missing/out.jsonl"], "argument --output: folder {tmp}/missing does not exist"),
    (["--ssl-root-certificates", "{tmp}/ca.pem"], "--ssl-root-certificates: no such file: {tmp}/ca.pem"),
    (["--monitor-url", "http://127.0.0.1:9"], "--monitor-token-file"),
], ids=["concurrency", "batch-size", "top-k", "deadline", "output-folder", "tls-file", "monitor-token"])
def test_bad_options_are_refused_before_any_call(options, message, test_files, tmp_path):
    """Checked when the command line is read: the URL points at nothing, so any call would fail differently."""
    options = [o.replace("{tmp}", str(tmp_path)) for o in options]
    result = run_cli("-m", "histoserve.client", "classify", test_files[0], "--url", "127.0.0.1:9", "--model", MODEL, *options,
                     check=False, timeout=60, env={**os.environ, "HISTOSERVE_MONITOR_TOKEN": ""})
    assert result.returncode == 2 and message.replace("{tmp}", str(tmp_path)) in result.stderr, result.stderr
    assert "cannot reach Triton" not in result.stderr and result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_rollout_status_refuses_bad_options_before_any_call(tmp_path):
    for options, message in ((["--version", "0"], "argument --version: must be at least 1, got 0"),
                             (["--version", "1", "--timeout", "-5"], "argument --timeout: must be above 0, got -5"),
                             (["--version", "1", "--admin-key-file", str(tmp_path / "key")], "admin key file")):
        result = run_cli("-m", "histoserve.client", "rollout-status", "--url", "127.0.0.1:9", "--model", MODEL, *options,
                         check=False, timeout=60)
        assert result.returncode == 2 and message in result.stderr, result.stderr
