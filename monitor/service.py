"""The monitor service: receives prediction records over HTTP, keeps a sliding window of the last
`window` records per model and version, compares each window with that version's drift baseline
(read from the model repository) and exposes the results as Prometheus metrics.

    POST /v1/records   a JSON array of records (records.py); answers {"accepted": n, "rejected": m, ...}
    GET  /metrics      Prometheus text: the windows are evaluated at each scrape
    GET  /v1/report    the same evaluation as JSON
    GET  /healthz      200 while the process runs

With a record file (record_log.py), every accepted record is also appended to it as a JSON line: a
restarted monitor replays it and takes up its windows where it left them, and `python -m monitor
report` reads it for windows over the history, with plots.

Metrics, labelled by model and version (drift ones only once a window holds `min_window` records):
histoserve_monitor_records_total, histoserve_monitor_records_rejected_total,
histoserve_monitor_records_unwritten_total (the record file failed), histoserve_monitor_window_records,
histoserve_monitor_baseline_missing (1: no readable drift_baseline.json for that version),
histoserve_drift_p_value{test,kind} and histoserve_drift_detected{test,kind} per test,
histoserve_prediction_drift, histoserve_input_drift (0/1, after the Bonferroni correction),
histoserve_estimated_accuracy (+ _low, _high: the 95 % interval), histoserve_baseline_expected_accuracy,
histoserve_accuracy_drop (0/1).
"""

from __future__ import annotations

import json
import sys
import threading
from collections import deque
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from histoserve.monitor.baseline import BaselineError, DriftBaseline, baseline_path, read_baseline
from histoserve.monitor.drift import ALPHA, MAX_ACCURACY_DROP, DriftReport, records_report
from histoserve.monitor.record_log import RecordLog
from histoserve.monitor.records import PredictionRecord, RecordError

MAX_BODY_BYTES = 16 * 2**20


class Monitor:
    """Windows, baselines and metrics; safe to call from the HTTP server's threads."""

    def __init__(self, repository: str | Path, window: int = 500, min_window: int = 100, alpha: float = ALPHA,
                 max_accuracy_drop: float = MAX_ACCURACY_DROP, record_file: str | Path | None = None,
                 record_file_max_bytes: int = 64 * 2**20):
        if not 0 < min_window <= window:
            raise ValueError(f"need 0 < min_window <= window, got {min_window} and {window}")
        self.repository, self.window, self.min_window = Path(repository), window, min_window
        self.alpha, self.max_accuracy_drop = alpha, max_accuracy_drop
        self.windows: dict[tuple[str, str], deque[PredictionRecord]] = {}
        self.baselines: dict[tuple[str, str], DriftBaseline | BaselineError] = {}
        self.lock = threading.Lock()
        # Every accepted record, appended as a JSON line: a restart replays it into the windows, and
        # `python -m monitor report` reads it later.
        self.record_log = RecordLog(record_file, record_file_max_bytes) if record_file else None
        self.restored = 0
        if self.record_log is not None:
            for record in self.record_log.replay():
                self.windows.setdefault((record.model, record.version), deque(maxlen=self.window)).append(record)
                self.restored += 1
        self.registry = CollectorRegistry()
        labels = ["model", "version"]
        self.records = Counter("histoserve_monitor_records", "Prediction records received", labels, registry=self.registry)
        self.rejected = Counter("histoserve_monitor_records_rejected", "Records refused as malformed", registry=self.registry)
        self.unwritten = Counter("histoserve_monitor_records_unwritten", "Records the windows took but the record file "
                                 "could not keep (disk full?)", registry=self.registry)
        self.record_file_failing = False
        self.window_records = Gauge("histoserve_monitor_window_records", "Records in the sliding window", labels,
                                    registry=self.registry)
        self.missing = Gauge("histoserve_monitor_baseline_missing", "1: no readable drift baseline for this version", labels,
                             registry=self.registry)
        self.p_value = Gauge("histoserve_drift_p_value", "p-value of each drift test, window vs baseline",
                             [*labels, "test", "kind"], registry=self.registry)
        self.detected = Gauge("histoserve_drift_detected", "1: the test rejects 'no drift' at the Bonferroni-corrected level",
                              [*labels, "test", "kind"], registry=self.registry)
        self.prediction_drift = Gauge("histoserve_prediction_drift", "1: predicted classes or confidence drifted", labels,
                                      registry=self.registry)
        self.input_drift = Gauge("histoserve_input_drift", "1: an input statistic drifted", labels, registry=self.registry)
        self.accuracy = Gauge("histoserve_estimated_accuracy", "Label-free accuracy estimate (mean calibrated top-1 probability)",
                              labels, registry=self.registry)
        self.accuracy_low = Gauge("histoserve_estimated_accuracy_low", "Lower end of its 95% interval", labels, registry=self.registry)
        self.accuracy_high = Gauge("histoserve_estimated_accuracy_high", "Upper end of its 95% interval", labels,
                                   registry=self.registry)
        self.expected = Gauge("histoserve_baseline_expected_accuracy", "The same estimate on the baseline split", labels,
                              registry=self.registry)
        self.accuracy_drop = Gauge("histoserve_accuracy_drop", "1: the estimate fell more than the allowed drop under the baseline's",
                                   labels, registry=self.registry)

    def add(self, records: list[PredictionRecord]) -> None:
        with self.lock:
            for record in records:
                key = (record.model, record.version)
                self.windows.setdefault(key, deque(maxlen=self.window)).append(record)
                self.records.labels(*key).inc()
            if self.record_log is not None:
                try:
                    self.record_log.append(records)
                except OSError as error:  # the windows have them; only the history (and a restart) lose them
                    self.unwritten.inc(len(records))
                    if not self.record_file_failing:
                        print(f"monitor: cannot write the record file: {error}", file=sys.stderr, flush=True)
                    self.record_file_failing = True
                else:
                    if self.record_file_failing:
                        print("monitor: the record file is writable again", file=sys.stderr, flush=True)
                    self.record_file_failing = False

    def baseline(self, model: str, version: str) -> DriftBaseline | BaselineError:
        key = (model, version)
        if key not in self.baselines or isinstance(self.baselines[key], BaselineError):  # a version may be published later
            try:
                self.baselines[key] = read_baseline(baseline_path(self.repository, model, version))
            except BaselineError as error:
                self.baselines[key] = error
        return self.baselines[key]

    def evaluate(self) -> dict[tuple[str, str], DriftReport | str]:
        """Each window against its baseline; updates the metrics. Values: the report, or why there is none."""
        with self.lock:
            windows = {key: list(records) for key, records in self.windows.items()}
        results: dict[tuple[str, str], DriftReport | str] = {}
        for key, records in windows.items():
            self.window_records.labels(*key).set(len(records))
            baseline = self.baseline(*key)
            self.missing.labels(*key).set(isinstance(baseline, BaselineError))
            if isinstance(baseline, BaselineError):
                results[key] = str(baseline)
                continue
            if len(records) < self.min_window:
                results[key] = f"{len(records)} records, drift is judged from {self.min_window}"
                continue
            report = records_report(baseline, records, self.alpha, self.max_accuracy_drop)
            for test in report.tests:
                self.p_value.labels(*key, test.name, test.kind).set(test.p_value)
                self.detected.labels(*key, test.name, test.kind).set(test.drifted)
            self.prediction_drift.labels(*key).set(report.prediction_drift)
            self.input_drift.labels(*key).set(report.input_drift)
            self.accuracy.labels(*key).set(report.estimated_accuracy)
            self.accuracy_low.labels(*key).set(report.estimated_accuracy_low)
            self.accuracy_high.labels(*key).set(report.estimated_accuracy_high)
            self.expected.labels(*key).set(report.baseline_expected_accuracy)
            self.accuracy_drop.labels(*key).set(report.accuracy_dropped)
            results[key] = report
        return results


def report_json(results: dict[tuple[str, str], DriftReport | str]) -> list[dict]:
    out = []
    for (model, version), result in results.items():
        entry = {"model": model, "version": version}
        if isinstance(result, str):
            entry["status"] = result
        else:
            entry |= asdict(result) | {"prediction_drift": result.prediction_drift, "input_drift": result.input_drift,
                                       "drift": result.drift}
        out.append(entry)
    return out


def make_server(monitor: Monitor, address: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # one line per scrape and post would drown the log
            pass

        def reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/metrics":
                monitor.evaluate()
                self.reply(200, generate_latest(monitor.registry), CONTENT_TYPE_LATEST)
            elif self.path == "/v1/report":
                self.reply(200, json.dumps(report_json(monitor.evaluate())).encode())
            elif self.path == "/healthz":
                self.reply(200, b"ok\n", "text/plain")
            else:
                self.reply(404, b'{"error": "not found"}')

        def do_POST(self) -> None:
            if self.path != "/v1/records":
                self.reply(404, b'{"error": "not found"}')
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self.reply(413, json.dumps({"error": f"body over {MAX_BODY_BYTES} bytes: send smaller batches"}).encode())
                return
            try:
                items = json.loads(self.rfile.read(length) or b"null")
            except json.JSONDecodeError as error:
                self.reply(400, json.dumps({"error": f"body is not JSON: {error}"}).encode())
                return
            if not isinstance(items, list):
                self.reply(400, b'{"error": "expected a JSON array of records"}')
                return
            accepted, errors = [], []
            for index, item in enumerate(items):
                try:
                    accepted.append(PredictionRecord.from_dict(item))
                except RecordError as error:
                    errors.append(f"record {index}: {error}")
            monitor.add(accepted)
            monitor.rejected.inc(len(errors))
            self.reply(200 if accepted or not errors else 400,
                       json.dumps({"accepted": len(accepted), "rejected": len(errors), "errors": errors[:5]}).encode())

    return ThreadingHTTPServer((address, port), Handler)
