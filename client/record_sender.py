"""Prediction records to the monitor (`python -m histoserve.monitor serve`), in the background.

Classification never waits for the monitor and never fails because of it: records go into a bounded
queue (`submit` does not block), a daemon thread posts them in batches, and a batch the monitor does
not take (down, slow, refusing) is dropped and counted, as is a record that finds the queue full.
Each POST carries the writer's bearer token (`--monitor-token-file`, or HISTOSERVE_MONITOR_TOKEN):
the monitor refuses writers without one.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import urllib.error
import urllib.request
from pathlib import Path

from histoserve.formats.records import PredictionRecord

BATCH, QUEUE, TIMEOUT_S = 256, 20_000, 2.0
TOKEN_VARIABLE = "HISTOSERVE_MONITOR_TOKEN"


class MonitorTokenError(ValueError):
    """No usable token; the message names the file or variable."""


def monitor_token(path: str | os.PathLike | None = None) -> str:
    """The writer's token: the first line of `path` that is neither blank nor a # comment, else
    HISTOSERVE_MONITOR_TOKEN."""
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as error:
            raise MonitorTokenError(f"monitor token file {path}: {error.strerror or error}") from error
        token = next((line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")), "")
        if not token:
            raise MonitorTokenError(f"monitor token file {path} holds no token")
        return token
    token = os.environ.get(TOKEN_VARIABLE, "").strip()
    if not token:
        raise MonitorTokenError(f"the monitor needs a writer token: give --monitor-token-file or set {TOKEN_VARIABLE}")
    return token


class MonitorSender:
    """Every submitted record ends as exactly one of `sent` or `dropped`, whatever the timing: a record
    is counted as `held` under the lock the moment the sender takes it off the queue, and a close()
    that gives up counts everything held as dropped, after which the sender posts nothing more and
    counts whatever it takes as dropped itself."""

    def __init__(self, url: str, token: str, batch: int = BATCH, capacity: int = QUEUE, timeout_s: float = TIMEOUT_S):
        self.endpoint = url.rstrip("/") + "/v1/records"
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        self.batch, self.timeout_s = batch, timeout_s
        self.queue: queue.Queue[PredictionRecord | None] = queue.Queue(capacity)
        self.sent = self.dropped = 0
        self.held = 0  # taken off the queue by the sender, neither sent nor dropped yet
        self.last_error = ""
        self.abandoned = False  # close() gave up waiting: what the sender held was counted as dropped
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="monitor-sender", daemon=True)
        self.thread.start()

    def submit(self, records: list[PredictionRecord]) -> None:
        for record in records:
            try:
                self.queue.put_nowait(record)
            except queue.Full:
                with self.lock:  # submit runs on the classifier's threads
                    self.dropped += 1

    def close(self, wait_s: float = 5.0) -> None:
        """Send what is queued, for up to `wait_s`; what is left is dropped and counted."""
        try:
            self.queue.put(None, timeout=wait_s)
        except queue.Full:
            pass
        self.thread.join(wait_s)
        with self.lock:
            if self.thread.is_alive():
                self.abandoned = True
                self.dropped += self.held
                self.held = 0
        while True:
            try:
                record = self.queue.get_nowait()
            except queue.Empty:
                break
            if record is not None:
                with self.lock:
                    self.dropped += 1

    def _take(self, timeout: float | None) -> PredictionRecord | None:
        """The next record, counted as held (or as dropped, once close() gave up); None at the end.
        Raises queue.Empty after `timeout`."""
        record = self.queue.get(timeout=timeout)
        if record is not None:
            with self.lock:
                if self.abandoned:
                    self.dropped += 1
                else:
                    self.held += 1
        return record

    def _run(self) -> None:
        while not self.abandoned:  # after close() gave up, nothing more is sent (and its end marker may be gone)
            first = self._take(None)
            if first is None:
                return
            batch, done = [first], False
            while len(batch) < self.batch:
                try:
                    record = self._take(0.2)
                except queue.Empty:
                    break
                if record is None:
                    done = True
                    break
                batch.append(record)
            with self.lock:
                if self.abandoned:  # close() counted this batch as dropped already
                    return
            self._post(batch)
            if done:
                return

    def _post(self, batch: list[PredictionRecord]) -> None:
        body = json.dumps([record.to_dict() for record in batch]).encode()
        request = urllib.request.Request(self.endpoint, body, self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                response.read()
            delivered = True
        except urllib.error.HTTPError as error:
            delivered = False
            self.last_error = (f"{error.code} {error.reason}: the monitor refused the writer token" if error.code == 401
                               else f"{error.code} {error.reason}")
        except (OSError, ValueError) as error:  # URLError, timeouts, refused connections
            delivered = False
            self.last_error = str(getattr(error, "reason", error))
        with self.lock:
            if not self.abandoned:
                self.sent += len(batch) if delivered else 0
                self.dropped += 0 if delivered else len(batch)
                self.held -= len(batch)
