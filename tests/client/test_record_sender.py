"""MonitorSender's promise: every submitted record ends as sent or as dropped, never neither, whenever
close() gives up. Each unlucky moment is forced with events, not sleeps."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from histoserve.client.record_sender import MonitorSender
from histoserve.formats.records import records_for

RECORDS = 300  # more than one batch of 256


class Monitor:
    """A real HTTP endpoint that counts the records it receives and can hold a POST until released."""

    def __init__(self):
        self.received, self.hold, self.holding = 0, threading.Event(), threading.Event()
        self.hold.set()
        monitor = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                monitor.holding.set()
                monitor.hold.wait(30)
                monitor.received += len(body)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()


def records(count: int):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 3, 8, 8), dtype=np.uint8)
    return records_for("digits", "1", images, rng.integers(0, 10, count), rng.uniform(0.1, 1, count))


def hold_the_queue(sender: MonitorSender, when: str):
    """Patch the sender's queue so that its next take stops at `when` until released: 'before' taking
    (the sender is collecting the rest of a batch), 'after' taking a record and before counting it."""
    stopped, release = threading.Event(), threading.Event()
    original, calls = sender.queue.get, []

    def get(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1 and when == "before":
            stopped.set()
            release.wait(30)
        record = original(*args, **kwargs)
        if len(calls) == 1 and when == "after":
            stopped.set()
            release.wait(30)
        return record

    sender.queue.get = get
    return stopped, release


@pytest.mark.parametrize("moment", ["collecting a batch", "holding a record not yet counted", "posting to a hung monitor"])
def test_every_record_is_sent_or_dropped_whenever_close_gives_up(moment):
    monitor = Monitor()
    try:
        sender = MonitorSender(monitor.url, "t" * 20, timeout_s=5.0)
        if moment == "posting to a hung monitor":
            monitor.hold.clear()
            sender.submit(records(RECORDS))
            assert monitor.holding.wait(10)
            stopped, release = monitor.holding, monitor.hold
        else:
            # the sender is blocked in its first take (the unpatched get) until records arrive; the
            # patched get serves every take after that one
            stopped, release = hold_the_queue(sender, "before" if moment == "collecting a batch" else "after")
            sender.submit(records(RECORDS))
            assert stopped.wait(10)
        sender.close(wait_s=0.2)  # gives up while the sender is stopped at that moment
        assert sender.abandoned
        release.set()
        sender.thread.join(15)
        assert not sender.thread.is_alive()
        assert sender.sent + sender.dropped == RECORDS, (sender.sent, sender.dropped, sender.held)
        assert sender.sent <= monitor.received
    finally:
        monitor.close()


def test_a_monitor_that_answers_gets_every_record():
    monitor = Monitor()
    try:
        sender = MonitorSender(monitor.url, "t" * 20)
        sender.submit(records(RECORDS))
        sender.close(wait_s=10)
        assert (sender.sent, sender.dropped, monitor.received) == (RECORDS, 0, RECORDS)
    finally:
        monitor.close()
