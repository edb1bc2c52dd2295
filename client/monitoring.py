"""Prediction records to the monitor (`python -m monitor serve`), in the background.

Classification never waits for the monitor and never fails because of it: records go into a bounded
queue (`submit` does not block), a daemon thread posts them in batches, and a batch the monitor does
not take (down, slow, refusing) is dropped and counted, as is a record that finds the queue full.
"""

from __future__ import annotations

import json
import queue
import threading
import urllib.request

from histoserve.monitor.records import PredictionRecord

BATCH, QUEUE, TIMEOUT_S = 256, 20_000, 2.0


class MonitorSender:
    def __init__(self, url: str, batch: int = BATCH, capacity: int = QUEUE, timeout_s: float = TIMEOUT_S):
        self.endpoint = url.rstrip("/") + "/v1/records"
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
        request = urllib.request.Request(self.endpoint, body, {"Content-Type": "application/json"}, method="POST")
        self.in_flight = len(batch)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                response.read()
            delivered = True
        except (OSError, ValueError) as error:  # URLError, HTTPError, timeouts, refused connections
            delivered = False
            self.last_error = str(getattr(error, "reason", error))
        with self.lock:
            if not self.abandoned:
                self.sent += len(batch) if delivered else 0
                self.dropped += 0 if delivered else len(batch)
            self.in_flight = 0
