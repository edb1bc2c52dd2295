"""The monitor service fed by the real client against the real Triton, and the offline report."""

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image, ImageOps
from prometheus_client.parser import text_string_to_metric_families

from histoserve.client.classifier import TritonClassifier
from histoserve.formats.preprocessing import find_images, preprocess_file
from histoserve.formats.records import records_for
from histoserve.monitor.service import Monitor, WriterTokens, make_server
from tests.conftest import MODEL, run_cli

TOKEN = "test-writer-token-0123456789"


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "monitor-token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
def monitor(repository, tmp_path, token_file):
    monitor = Monitor(repository, window=500, min_window=50, record_file=tmp_path / "records.jsonl")
    server = make_server(monitor, "127.0.0.1", 0, WriterTokens(token_file))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def post(url: str, body, token: str | None = TOKEN) -> tuple[int, dict]:
    """POST /v1/records; (status, JSON answer)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(f"{url}/v1/records", json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def metrics(url: str) -> dict[tuple, float]:
    """{(sample name, (label, value), ...): value} from the monitor's /metrics, parsed by prometheus_client."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return {(sample.name, *sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def key(name: str, **extra) -> tuple:
    return (name, *sorted({"model": MODEL, "version": "1", **extra}.items()))


def inverted_copies(folder, target):
    for path in find_images(folder):
        out = target / path.parent.name / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.invert(Image.open(path).convert("RGB")).save(out)
    return target


def test_the_client_feeds_the_monitor_and_a_shift_raises_its_drift_metrics(server, repository, monitor, token_file, digits_root,
                                                                           tmp_path):
    test_split = digits_root / "test"
    files = len(find_images(test_split))
    first = run_cli("-m", "histoserve.client", "classify", test_split, "--url", server.grpc_url, "--model", MODEL,
                    "--monitor-url", monitor, "--monitor-token-file", token_file, check=False, timeout=300)
    assert first.returncode == 0, first.stderr
    seen = metrics(monitor)
    assert seen[key("histoserve_monitor_records_total")] == files
    assert seen[key("histoserve_monitor_baseline_missing")] == 0
    # the baseline was measured on these very images: nothing may drift
    assert seen[key("histoserve_input_drift")] == seen[key("histoserve_prediction_drift")] == 0
    assert seen[key("histoserve_drift_p_value", test="mean_red", kind="input")] > 0.5
    assert abs(seen[key("histoserve_estimated_accuracy")] - seen[key("histoserve_baseline_expected_accuracy")]) < 1e-6

    shifted = inverted_copies(test_split, tmp_path / "inverted")
    second = run_cli("-m", "histoserve.client", "classify", shifted, "--url", server.grpc_url, "--model", MODEL,
                     "--monitor-url", monitor, check=False, timeout=300, env={**os.environ, "HISTOSERVE_MONITOR_TOKEN": TOKEN})
    assert second.returncode == 0, second.stderr
    seen = metrics(monitor)
    assert seen[key("histoserve_monitor_window_records")] == min(500, 2 * files)
    assert seen[key("histoserve_input_drift")] == 1
    assert seen[key("histoserve_drift_detected", test="brightness", kind="input")] == 1
    report = json.loads(urllib.request.urlopen(f"{monitor}/v1/report", timeout=10).read())
    assert any(entry["model"] == MODEL and entry["drift"] for entry in report)
    # the record file holds both folders' records in order, for the offline report
    recorded = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len(recorded) == 2 * files and {r["version"] for r in recorded} == {"1"}
    offline = run_cli("-m", "histoserve.monitor", "report", tmp_path / "records.jsonl", "--repository", repository,
                      "--window", files, "--out", tmp_path / "report", check=False, timeout=120)
    verdicts = [line for line in offline.stdout.splitlines() if line.startswith(MODEL)]
    assert offline.returncode == 1 and len(verdicts) == 2, offline.stdout + offline.stderr
    assert "DRIFT" not in verdicts[0] and "DRIFT" in verdicts[1]


def test_malformed_records_are_refused_naming_the_field(monitor):
    status, answer = post(monitor, [{"model": MODEL, "version": "1", "predicted": "seven", "max_probability": 0.9}])
    assert status == 400 and "predicted" in answer["errors"][0]
    assert metrics(monitor)[("histoserve_monitor_records_rejected_total", ("reason", "malformed"))] == 1


@pytest.mark.parametrize("monitor_state", ["stopped", "hung"])
def test_a_monitor_that_is_down_never_fails_or_holds_up_classification(server, digits_root, monitor_state):
    """Stopped: nothing listens. Hung: a socket that accepts connections and never answers."""
    folder = digits_root / "test"
    files = len(find_images(folder))
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    port = hung.getsockname()[1]
    if monitor_state == "hung":
        hung.listen(64)
    else:
        hung.close()
    try:
        started = time.monotonic()
        plain = run_cli("-m", "histoserve.client", "classify", folder, "--url", server.grpc_url, "--model", MODEL, "--json", timeout=300)
        alone = time.monotonic() - started
        started = time.monotonic()
        monitored = run_cli("-m", "histoserve.client", "classify", folder, "--url", server.grpc_url, "--model", MODEL, "--json",
                            "--monitor-url", f"http://127.0.0.1:{port}", check=False, timeout=300,
                            env={**os.environ, "HISTOSERVE_MONITOR_TOKEN": TOKEN})
        took = time.monotonic() - started
    finally:
        hung.close()
    assert monitored.returncode == 0, monitored.stderr
    assert [json.loads(line)["predictions"] for line in monitored.stdout.splitlines()] == \
        [json.loads(line)["predictions"] for line in plain.stdout.splitlines()]
    assert f"monitor: {files} record(s) dropped, 0 sent" in monitored.stderr
    # the sender gives up at exit after at most its 2 s wait (plus one 2 s request timeout when hung)
    assert took < alone + 8, f"{took:.1f} s with the monitor {monitor_state}, {alone:.1f} s without"


def test_offline_report_flags_the_windows_after_a_shift(server, repository, digits_root, tmp_path):
    # a random draw, not the first 200 by path: those are sorted by class, and windows of classes 0-3
    # against windows of 3-7 are a shift of their own (seen as drift in max_probability with a weak model)
    everything = find_images(digits_root / "test")
    paths = [everything[i] for i in np.random.default_rng(0).permutation(len(everything))[:200]]
    with TritonClassifier(server.grpc_url, MODEL) as classifier:
        images = np.stack([preprocess_file(p, classifier.spec) for p in paths])
        records = []
        for batch in (images, 255 - images):  # as taken, then with inverted contrast
            for start in range(0, len(batch), 16):  # each request traced (a made-up trace id per request)
                rows = classifier.infer(batch[start:start + 16], top_k=1)
                records += records_for(MODEL, "1", batch[start:start + 16], [r[0].index for r in rows],
                                       [r[0].score for r in rows], f"{len(records) + 1:032x}")
    # as the monitor leaves them: a rotated file with the older half, the current one with the rest,
    # and a line cut short by a crash in between (skipped with a warning, not fatal)
    older, current = tmp_path / "records.jsonl.1", tmp_path / "records.jsonl"
    older.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records[:200]) + '{"model": "dig')
    current.write_text("\n" + "".join(json.dumps(r.to_dict()) + "\n" for r in records[200:]))
    out = tmp_path / "report"
    result = run_cli("-m", "histoserve.monitor", "report", older, current, "--repository", repository, "--window", 100, "--out", out,
                     check=False, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"warning: skipped {older}:201:" in result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(MODEL)]
    assert len(lines) == 4
    assert all(" no " in line.split("DRIFT")[0] for line in lines[:2]) and all("DRIFT" in line for line in lines[2:])
    entries = json.loads((out / "report.json").read_text())
    assert [e["drift"] for e in entries] == [False, False, True, True]
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    # a drifting window names requests to look up: its least confident traced ones, in its own records
    follow = [line.split("traces to follow: ")[1].split(", ") for line in result.stdout.splitlines() if "traces to follow" in line]
    assert len(follow) == 2 and follow == [e["trace_ids"] for e in entries[2:]]
    for window, traces in zip((records[200:300], records[300:]), follow, strict=True):
        mine = sorted((r for r in window), key=lambda r: r.max_probability)
        assert len(traces) == 5 and traces[0] == mine[0].trace_id
        assert set(traces) <= {r.trace_id for r in window}


def test_the_load_test_feeds_the_monitor_too(server, monitor, token_file, digits_root):
    result = run_cli("-m", "histoserve.loadtest", "locust", "--headless", "--only-summary", "--users", 2, "--spawn-rate", 2,
                     "--run-time", "4s", "--triton-url", server.grpc_url, "--model", MODEL, "--images", digits_root / "test",
                     "--max-images", 64, "--monitor-url", monitor, "--monitor-token-file", token_file, "--fail-ratio", 0,
                     check=False, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    seen = metrics(monitor)
    assert seen[key("histoserve_monitor_records_total")] > 20
    assert seen[key("histoserve_monitor_baseline_missing")] == 0
