"""The monitor service: receives prediction records over HTTP, keeps a sliding window of the last
`window` records per model and version, compares each window with that version's drift baseline
(read from the model repository) and exposes the results as Prometheus metrics.

    POST /v1/records   a JSON array of records (formats/records.py), with `Authorization: Bearer <token>`;
                       answers {"accepted": n, "rejected": m, "errors": [...]}
    GET  /metrics      Prometheus text: the windows are evaluated at each scrape
    GET  /v1/report    the same evaluation as JSON
    GET  /healthz      200 while the process runs

Writers authenticate: a POST without one of the tokens in the token file (or HISTOSERVE_MONITOR_TOKEN)
gets 401 and changes nothing; the file is read again when it changes, so a rotated Kubernetes Secret
takes effect without a restart (keep the old and the new token in it while clients move over).
Records are taken only for a model version the repository holds (`<repository>/<model>/<version>/`,
names checked before any path is built); others are refused by name. At most `max_windows` model
versions are watched at once: the one updated longest ago is dropped, with its Prometheus series,
when another one arrives, so neither memory nor series grow without bound. Reads stay open (the
NetworkPolicy admits only Prometheus and the clients).

With a record file (record_log.py), every accepted record is also appended to it as a JSON line: a
restarted monitor replays it (`Monitor.restore()`) and takes up its windows where it left them, and `python -m histoserve.monitor
report` reads it for windows over the history, with plots.

Metrics, labelled by model and version where they are about one (records_rejected by reason; drift ones
only once a window holds `min_window` records):
histoserve_monitor_records_total, histoserve_monitor_records_rejected_total,
histoserve_monitor_records_unwritten_total (the record file failed), histoserve_monitor_window_records,
histoserve_monitor_unauthorized_requests_total, histoserve_monitor_windows_evicted_total,
histoserve_monitor_baseline_missing (1: no readable drift_baseline.json for that version),
histoserve_drift_p_value{test,kind} and histoserve_drift_detected{test,kind} per test,
histoserve_prediction_drift, histoserve_input_drift (0/1, after the Bonferroni correction),
histoserve_estimated_accuracy (+ _low, _high: the 95 % interval), histoserve_baseline_expected_accuracy,
histoserve_accuracy_drop (0/1). They live in monitor/metrics.py (`MonitorMetrics`).
"""

from __future__ import annotations

import hmac
import json
import os
import sys
import threading
from collections import OrderedDict, deque
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from histoserve.formats.baseline import BaselineError, DriftBaseline, baseline_path, read_baseline
from histoserve.formats.records import PredictionRecord, RecordError
from histoserve.formats.repository_layout import is_model_name, is_version_name
from histoserve.monitor.drift import ALPHA, MAX_ACCURACY_DROP, DriftReport, records_report
from histoserve.monitor.metrics import MonitorMetrics
from histoserve.monitor.record_log import RecordLog

MAX_BODY_BYTES = 16 * 2**20
TOKEN_VARIABLE = "HISTOSERVE_MONITOR_TOKEN"
# The repository's own name rules (formats/repository_layout.py), bounded here: a name from a request
# becomes a path, so no '..' anywhere and no name longer than a file system takes.
MAX_MODEL_NAME, MAX_VERSION_NAME = 128, 19


class TokenError(ValueError):
    """No usable writer token; the message names the file or variable."""


class WriterTokens:
    """The bearer tokens a writer may present: one per line of `path` (blank lines and # comments
    skipped), re-read when the file changes; or the single token of HISTOSERVE_MONITOR_TOKEN."""

    MIN_LENGTH = 16

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else None
        self.lock = threading.Lock()
        self.stamp: tuple | None = None
        self.tokens: tuple[bytes, ...] = ()
        if self.path is None:
            value = os.environ.get(TOKEN_VARIABLE, "").strip()
            if not value:
                raise TokenError(f"writers need a token: give --token-file or set {TOKEN_VARIABLE}")
            self.tokens = (self._checked(value, TOKEN_VARIABLE),)
        else:
            self._reload()

    def _checked(self, token: str, where: str) -> bytes:
        if len(token) < self.MIN_LENGTH or not token.isascii() or not token.isprintable() or " " in token:
            raise TokenError(f"{where}: a token is at least {self.MIN_LENGTH} printable ASCII characters without spaces")
        return token.encode()

    def _reload(self) -> None:
        try:
            status = self.path.stat()
            stamp = (status.st_ino, status.st_mtime_ns, status.st_size)
            if stamp == self.stamp:
                return
            lines = self.path.read_text().splitlines()
        except OSError as error:
            if self.tokens:  # keep the last good tokens while a Secret update swaps the file
                return
            raise TokenError(f"token file {self.path}: {error.strerror or error}") from error
        tokens = tuple(self._checked(line.strip(), f"token file {self.path}") for line in lines
                       if line.strip() and not line.lstrip().startswith("#"))
        if not tokens:
            raise TokenError(f"token file {self.path} holds no token")
        self.tokens, self.stamp = tokens, stamp

    def admits(self, authorization: str | None) -> bool:
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return False
        if self.path is not None:
            with self.lock:
                try:
                    self._reload()
                except TokenError as error:
                    print(f"monitor: {error}; keeping the previous tokens", file=sys.stderr, flush=True)
        candidate = presented.strip().encode()
        # compare with every token, in constant time each: the answer's timing names none of them
        return any([hmac.compare_digest(candidate, token) for token in self.tokens])


def why_not_held(repository: Path, model: str, version: str) -> str | None:
    """Why a record for this model version is refused (not a name, not a number, not in the repository);
    None when the repository holds it."""
    if len(model) > MAX_MODEL_NAME or not is_model_name(model) or ".." in model:
        return f"model {model[:64]!r} is not a model name"
    if len(version) > MAX_VERSION_NAME or not is_version_name(version):
        return f"version {version[:32]!r} is not a version number"
    if not (repository / model / version).is_dir():
        return f"model {model!r} version {version} is not in the model repository"
    return None


class Monitor:
    """Windows, baselines and metrics; safe to call from the HTTP server's threads."""

    def __init__(self, repository: str | Path, window: int = 500, min_window: int = 100, alpha: float = ALPHA,
                 max_accuracy_drop: float = MAX_ACCURACY_DROP, record_file: str | Path | None = None,
                 record_file_max_bytes: int = 64 * 2**20, max_windows: int = 32):
        if not 0 < min_window <= window:
            raise ValueError(f"need 0 < min_window <= window, got {min_window} and {window}")
        if max_windows < 1:
            raise ValueError(f"need max_windows >= 1, got {max_windows}")
        self.repository, self.window, self.min_window = Path(repository), window, min_window
        self.alpha, self.max_accuracy_drop, self.max_windows = alpha, max_accuracy_drop, max_windows
        # least recently updated first: the one dropped when a new model version arrives
        self.windows: OrderedDict[tuple[str, str], deque[PredictionRecord]] = OrderedDict()
        self.baselines: dict[tuple[str, str], DriftBaseline | BaselineError] = {}
        self.tested: dict[tuple[str, str], set[tuple[str, str]]] = {}  # (test, kind) series set per model version
        self.lock = threading.Lock()
        self.metrics = MonitorMetrics()
        self.registry = self.metrics.registry
        self.record_file_failing = False
        # Every accepted record, appended as a JSON line: restore() replays it into the windows after a
        # restart, and `python -m histoserve.monitor report` reads it.
        self.record_log = RecordLog(record_file, record_file_max_bytes) if record_file else None
        self.restored = self.replay_refused = 0

    def restore(self) -> Monitor:
        """Replay the record file into the windows, where the monitor left them before a restart:
        before the server starts. Records of versions the repository no longer holds are left out
        (`replay_refused`); unreadable lines are in `record_log.skipped`."""
        if self.record_log is None:
            return self
        for record in self.record_log.replay():
            if why_not_held(self.repository, record.model, record.version) is None:
                self._place(record)
                self.restored += 1
            else:
                self.replay_refused += 1
        return self

    def _place(self, record: PredictionRecord) -> None:
        """Into its window (under the lock, or before the server starts); drops the window updated
        longest ago, with its series, when a new model version would exceed max_windows."""
        key = (record.model, record.version)
        window = self.windows.get(key)
        if window is None:
            while len(self.windows) >= self.max_windows:
                self._forget(next(iter(self.windows)))
            window = self.windows[key] = deque(maxlen=self.window)
        self.windows.move_to_end(key)
        window.append(record)

    def _forget(self, key: tuple[str, str]) -> None:
        self.windows.pop(key, None)
        self.baselines.pop(key, None)
        self.metrics.evicted.inc()
        self.metrics.forget(key, self.tested.pop(key, set()))

    def admit(self, records: dict[int, PredictionRecord]) -> tuple[list[PredictionRecord], dict[int, str]]:
        """Of records by their place in a request: those for model versions the repository holds, and
        why each other one is refused."""
        verdicts: dict[tuple[str, str], str | None] = {}
        kept, refused = [], {}
        for index, record in records.items():
            key = (record.model, record.version)
            if key not in verdicts:
                verdicts[key] = why_not_held(self.repository, *key)
            if verdicts[key] is None:
                kept.append(record)
            else:
                refused[index] = verdicts[key]
        return kept, refused

    def add(self, records: list[PredictionRecord]) -> None:
        with self.lock:
            for record in records:
                self._place(record)
                self.metrics.records.labels(record.model, record.version).inc()
            if self.record_log is not None:
                try:
                    self.record_log.append(records)
                except OSError as error:  # the windows have them; only the history (and a restart) lose them
                    self.metrics.unwritten.inc(len(records))
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
            baseline = self.baseline(*key)
            with self.lock:  # a window dropped meanwhile gets no series back
                if key not in self.windows:
                    continue
                self.metrics.set_window(key, len(records), isinstance(baseline, BaselineError))
            if isinstance(baseline, BaselineError):
                results[key] = str(baseline)
                continue
            if len(records) < self.min_window:
                results[key] = f"{len(records)} records, drift is judged from {self.min_window}"
                continue
            report = records_report(baseline, records, self.alpha, self.max_accuracy_drop)
            with self.lock:
                if key not in self.windows:
                    continue
                self.tested.setdefault(key, set()).update(self.metrics.set_report(key, report))
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


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class MonitorHandler(BaseHTTPRequestHandler):
    """The monitor's HTTP face; make_server binds it to one Monitor and its writers' tokens."""

    monitor: Monitor
    tokens: WriterTokens

    def log_message(self, *args) -> None:  # one line per scrape and post would drown the log
        pass

    def reply(self, status: int, body: bytes, content_type: str = "application/json", headers: dict | None = None) -> None:
        self.send_response(status)
        for name, value in {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/metrics":
            self.monitor.evaluate()
            self.reply(200, generate_latest(self.monitor.registry), CONTENT_TYPE_LATEST)
        elif self.path == "/v1/report":
            self.reply(200, json.dumps(report_json(self.monitor.evaluate())).encode())
        elif self.path == "/healthz":
            self.reply(200, b"ok\n", "text/plain")
        else:
            self.reply(404, b'{"error": "not found"}')

    def do_POST(self) -> None:
        if self.path != "/v1/records":
            self.reply(404, b'{"error": "not found"}')
            return
        if not self.tokens.admits(self.headers.get("Authorization")):
            self.monitor.metrics.unauthorized.inc()
            self.close_connection = True  # the body is never read
            self.reply(401, b'{"error": "a writer sends Authorization: Bearer <token> (python -m histoserve.client classify '
                            b'--monitor-token-file)"}', headers={"WWW-Authenticate": 'Bearer realm="histoserve-monitor"'})
            return
        try:
            items = self.json_array()
        except BadRequest as error:
            self.reply(error.status, json.dumps({"error": str(error)}).encode())
            return
        parsed, malformed = {}, {}
        for index, item in enumerate(items):
            try:
                parsed[index] = PredictionRecord.from_dict(item)
            except RecordError as error:
                malformed[index] = str(error)
        accepted, unknown = self.monitor.admit(parsed)
        self.monitor.metrics.rejected.labels("malformed").inc(len(malformed))
        self.monitor.metrics.rejected.labels("unknown_version").inc(len(unknown))
        self.monitor.add(accepted)
        errors = [f"record {index}: {why}" for index, why in sorted({**malformed, **unknown}.items())]
        self.reply(200 if accepted or not errors else 400,
                   json.dumps({"accepted": len(accepted), "rejected": len(errors), "errors": errors[:5]}).encode())

    def json_array(self) -> list:
        """The request body, a JSON array (BadRequest otherwise)."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadRequest(400, "Content-Length is not a number") from None
        if length > MAX_BODY_BYTES:
            raise BadRequest(413, f"body over {MAX_BODY_BYTES} bytes: send smaller batches")
        try:
            items = json.loads(self.rfile.read(length) or b"null")
        except json.JSONDecodeError as error:
            raise BadRequest(400, f"body is not JSON: {error}") from None
        if not isinstance(items, list):
            raise BadRequest(400, "expected a JSON array of records")
        return items


def make_server(monitor: Monitor, address: str, port: int, tokens: WriterTokens) -> ThreadingHTTPServer:
    handler = type("BoundMonitorHandler", (MonitorHandler,), {"monitor": monitor, "tokens": tokens})
    return ThreadingHTTPServer((address, port), handler)
