"""Prediction records to the monitor (`python -m monitor serve`), in the background.

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

from histoserve.monitor.records import PredictionRecord

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
    def __init__(self, url: str, token: str, batch: int = BATCH, capacity: int = QUEUE, timeout_s: float = TIMEOUT_S):
        self.endpoint = url.rstrip("/") + "/v1/records"
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        self.batch, self.timeout_s = batch, timeout_s
        self.queue: queue.Queue[PredictionRecord | None] = queue.Queue(capacity)
        self.sent = self.dropped = self.in_flight = 0
        self.last_error = ""
        self.abandoned = False  # close() gave up waiting: what is still in flight was counted as dropped
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
                self.dropped += self.in_flight
        while True:
            try:
                self.dropped += self.queue.get_nowait() is not None
            except queue.Empty:
                break

    def _run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch, done = [first], False
            while len(batch) < self.batch:
                try:
                    record = self.queue.get(timeout=0.2)
                except queue.Empty:
                    break
                if record is None:
                    done = True
                    break
                batch.append(record)
            self._post(batch)
            if done:
                return

    def _post(self, batch: list[PredictionRecord]) -> None:
        body = json.dumps([record.to_dict() for record in batch]).encode()
        request = urllib.request.Request(self.endpoint, body, self.headers, method="POST")
        self.in_flight = len(batch)
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
            self.in_flight = 0
