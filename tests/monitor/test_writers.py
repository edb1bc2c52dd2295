"""Who may write to the drift monitor, and how much it keeps: a bearer token, records only for model
versions the repository holds, a bounded number of windows and series."""

import json
import os
import shutil
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from histoserve.formats.records import records_for
from histoserve.monitor.service import Monitor, WriterTokens, make_server
from tests.conftest import MODEL, run_cli

TOKEN = "writer-token-aaaaaaaaaaaaaaaa"
OTHER = "writer-token-bbbbbbbbbbbbbbbb"


def records(count: int, model: str = MODEL, version: str = "1", seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 3, 8, 8), dtype=np.uint8)
    return [r.to_dict() for r in records_for(model, version, images, rng.integers(0, 10, count),
                                             rng.uniform(0.1, 1.0, count).round(6))]


class Running:
    """A monitor over a repository of empty version folders, served on a free port."""

    def __init__(self, root, versions=(("digits", "1"),), max_windows: int = 32, tokens: str = TOKEN, baseline=None):
        self.repository = root / "models"
        for model, version in versions:
            (self.repository / model / version).mkdir(parents=True, exist_ok=True)
            if baseline is not None:  # each version judged against a real baseline: drift series for each
                shutil.copy(baseline, self.repository / model / version / baseline.name)
        self.token_file = root / "tokens"
        self.token_file.write_text(tokens + "\n")
        self.record_file = root / "records.jsonl"
        self.monitor = Monitor(self.repository, window=50, min_window=10, record_file=self.record_file, max_windows=max_windows)
        self.server = make_server(self.monitor, "127.0.0.1", 0, WriterTokens(self.token_file))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def post(self, body, authorization: str | None = f"Bearer {TOKEN}") -> tuple[int, dict, dict]:
        headers = {"Content-Type": "application/json", **({"Authorization": authorization} if authorization else {})}
        request = urllib.request.Request(f"{self.url}/v1/records", json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read()), dict(response.headers)
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}"), dict(error.headers)

    def metrics(self) -> dict[tuple, float]:
        text = urllib.request.urlopen(f"{self.url}/metrics", timeout=10).read().decode()
        return {(sample.name, *sorted(sample.labels.items())): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.monitor.record_log.close()


@pytest.fixture
def running(tmp_path):
    running = Running(tmp_path)
    yield running
    running.close()


FORGED = [None, f"Bearer {OTHER}", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN}x", f"bearer  {TOKEN[:-1]}"]


@pytest.mark.parametrize("authorization", FORGED, ids=["none", "another token", "not bearer", "empty", "longer", "shorter"])
def test_forged_writes_are_refused_and_change_nothing(running, authorization):
    status, answer, headers = running.post(records(30), authorization)
    assert status == 401 and "Bearer" in headers.get("WWW-Authenticate", "") and "--monitor-token-file" in answer["error"]
    seen = running.metrics()
    assert seen[("histoserve_monitor_unauthorized_requests_total",)] == 1
    assert not [k for k in seen if k[0] in ("histoserve_monitor_records_total", "histoserve_monitor_window_records")]
    assert running.monitor.windows == {} and running.record_file.read_text() == ""
    status, answer, _ = running.post(records(30))  # the writer with the token gets in
    assert (status, answer["accepted"]) == (200, 30)
    assert running.metrics()[("histoserve_monitor_window_records", ("model", MODEL), ("version", "1"))] == 30


def test_records_for_model_versions_the_repository_does_not_hold_are_refused_by_name(running):
    good = records(3)
    batch = [good[0], *records(1, version="99"), *records(1, model="other"), *records(1, model="../../etc"),
             *records(1, version="1/../../x"), good[1], *records(1, version="01"), good[2]]
    status, answer, _ = running.post(batch)
    assert status == 200 and (answer["accepted"], answer["rejected"]) == (3, 5)
    assert answer["errors"] == [
        "record 1: model 'digits' version 99 is not in the model repository",
        "record 2: model 'other' version 1 is not in the model repository",
        "record 3: model '../../etc' is not a model name",
        "record 4: version '1/../../x' is not a version number",
        "record 6: version '01' is not a version number",
    ]
    assert list(running.monitor.windows) == [(MODEL, "1")] and len(running.monitor.windows[(MODEL, "1")]) == 3
    seen = running.metrics()
    assert seen[("histoserve_monitor_records_rejected_total", ("reason", "unknown_version"))] == 5
    assert [json.loads(line)["version"] for line in running.record_file.read_text().splitlines()] == ["1"] * 3
    status, answer, _ = running.post(records(2, version="7"))  # all refused: 400
    assert status == 400 and answer["accepted"] == 0


def series_of(seen: dict, version: str) -> list[tuple]:
    return [key for key in seen if ("version", version) in key]


def test_the_windows_and_their_series_are_bounded(tmp_path, repository):
    versions = [("digits", str(v)) for v in range(1, 41)]
    running = Running(tmp_path, versions=versions, max_windows=3, baseline=repository / MODEL / "1" / "drift_baseline.json")
    try:
        for _, version in versions:  # 40 versions written to, 20 records each
            assert running.post(records(20, version=version, seed=int(version)))[1]["accepted"] == 20
            running.metrics()  # a scrape evaluates every window: drift series for each
        seen = running.metrics()
        assert list(running.monitor.windows) == [("digits", "38"), ("digits", "39"), ("digits", "40")]
        assert seen[("histoserve_monitor_windows_evicted_total",)] == 37
        assert {v for _, v in versions if series_of(seen, v)} == {"38", "39", "40"}  # no series left for the others
        per_version = len(series_of(seen, "40"))
        assert per_version > 20 and len([k for k in seen if any(label == "version" for label, _ in k[1:])]) == 3 * per_version
        running.post(records(20, version="38", seed=99))  # written to again: now the newest, 39 goes next
        running.post(records(20, version="1", seed=98))
        assert list(running.monitor.windows) == [("digits", "40"), ("digits", "38"), ("digits", "1")]
    finally:
        running.close()


def test_a_rotated_token_file_takes_effect_without_a_restart(running):
    assert running.post(records(5))[0] == 200
    running.token_file.write_text(f"# rotation: both until every writer has the new one\n{TOKEN}\n{OTHER}\n")
    assert running.post(records(5), f"Bearer {OTHER}")[0] == 200
    assert running.post(records(5))[0] == 200
    running.token_file.write_text(f"{OTHER}\n")
    assert running.post(records(5))[0] == 401
    assert running.post(records(5), f"Bearer {OTHER}")[0] == 200


@pytest.mark.parametrize("setup, message", [
    (lambda tmp: [], "give --token-file or set HISTOSERVE_MONITOR_TOKEN"),
    (lambda tmp: ["--token-file", tmp / "absent"], "token file"),
    (lambda tmp: (tmp / "short").write_text("abc\n") and ["--token-file", tmp / "short"], "at least 16"),
    (lambda tmp: (tmp / "empty").write_text("# nothing\n") and ["--token-file", tmp / "empty"], "holds no token"),
], ids=["none", "missing file", "too short", "empty file"])
def test_the_monitor_will_not_run_without_writer_tokens(tmp_path, setup, message):
    result = run_cli("-m", "histoserve.monitor", "serve", "--repository", tmp_path, "--port", 0, *setup(tmp_path), check=False,
                     timeout=60, env={**os.environ, "HISTOSERVE_MONITOR_TOKEN": ""})
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_the_client_sends_its_token_and_a_refused_one_costs_no_result(server, tmp_path, test_files):
    running = Running(tmp_path)
    try:
        files = [str(p) for p in test_files[:40]]
        common = ["-m", "histoserve.client", "classify", *files, "--url", server.grpc_url, "--model", MODEL, "--json",
                  "--monitor-url", running.url]
        wrong = tmp_path / "wrong-token"
        wrong.write_text(OTHER + "\n")
        refused = run_cli(*common, "--monitor-token-file", wrong, check=False, timeout=120)
        accepted = run_cli(*common, "--monitor-token-file", running.token_file, check=False, timeout=120)
        missing = run_cli(*common, check=False, timeout=60, env={**os.environ, "HISTOSERVE_MONITOR_TOKEN": ""})
    finally:
        running.close()
    assert refused.returncode == accepted.returncode == 0, refused.stderr + accepted.stderr
    assert refused.stdout == accepted.stdout  # the monitor never changes a result
    assert "monitor: 40 record(s) dropped, 0 sent (401 Unauthorized: the monitor refused the writer token)" in refused.stderr
    assert "dropped" not in accepted.stderr and len(running.monitor.windows[(MODEL, "1")]) == 40
    assert missing.returncode == 2 and "--monitor-token-file" in missing.stderr
