"""The monitor's record file: a restart takes up the windows where they were, a line cut short by a
crash is skipped, and rotation bounds the disk."""

import json
import re
import resource
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from histoserve.formats.image_statistics import INPUT_STATISTICS
from histoserve.formats.records import PredictionRecord, RecordError, read_records, records_for
from histoserve.monitor.record_log import RecordLog
from histoserve.monitor.service import Monitor
from histoserve.serve.triton_flags import free_ports
from tests.conftest import ROOT

TOKEN = "test-writer-token-0123456789"


def holding(root, *versions: tuple[str, str]):
    """A model repository holding these (model, version) folders: the monitor takes records only for those."""
    for model, version in versions:
        (root / model / version).mkdir(parents=True, exist_ok=True)
    return root


def post(port: int, batch: list[dict], token: str = TOKEN) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/records", json.dumps(batch).encode(),
                                     {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}, method="POST")
    return json.loads(urllib.request.urlopen(request, timeout=10).read())


def records(count: int, model: str = "digits", version: str = "1", seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 3, 8, 8), dtype=np.uint8)
    return records_for(model, version, images, rng.integers(0, 10, count), rng.uniform(0.1, 1.0, count).round(6))


def test_a_restarted_monitor_takes_up_each_window_where_it_was(tmp_path):
    first, other = records(150), records(30, version="2", seed=1)
    repository = holding(tmp_path / "models", ("digits", "1"), ("digits", "2"))
    monitor = Monitor(repository, window=100, min_window=10, record_file=tmp_path / "records.jsonl")
    monitor.add(first[:70])
    monitor.add(other)
    monitor.add(first[70:])
    monitor.record_log.close()
    restarted = Monitor(repository, window=100, min_window=10, record_file=tmp_path / "records.jsonl")
    assert restarted.windows == {}  # constructing opens the file; the restore step replays it
    assert restarted.restore() is restarted and restarted.restored == 180
    assert list(restarted.windows[("digits", "1")]) == first[-100:]
    assert list(restarted.windows[("digits", "2")]) == other


def test_a_restart_leaves_out_the_records_of_versions_no_longer_in_the_repository(tmp_path):
    repository = holding(tmp_path / "models", ("digits", "1"), ("digits", "2"))
    monitor = Monitor(repository, window=100, min_window=10, record_file=tmp_path / "records.jsonl")
    monitor.add(records(20))
    monitor.add(records(30, version="2", seed=1))
    monitor.record_log.close()
    (repository / "digits" / "2").rmdir()  # version 2 was rolled back
    restarted = Monitor(repository, window=100, min_window=10, record_file=tmp_path / "records.jsonl").restore()
    assert (restarted.restored, restarted.replay_refused) == (20, 30)
    assert list(restarted.windows) == [("digits", "1")]


def test_without_a_record_file_a_restart_starts_empty(tmp_path):
    repository = holding(tmp_path, ("digits", "1"))
    monitor = Monitor(repository, window=100, min_window=10)
    monitor.add(records(50))
    assert Monitor(repository, window=100, min_window=10).restore().windows == {}


def test_a_line_cut_short_is_skipped_and_the_next_append_starts_a_new_line(tmp_path):
    path = tmp_path / "records.jsonl"
    before, after = records(5), records(3, seed=1)
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in before) + '{"model": "digits", "vers')
    log = RecordLog(path)
    log.append(after)
    log.close()
    replayed = RecordLog(path)
    assert list(replayed.replay()) == before + after
    [skipped] = replayed.skipped
    assert skipped.startswith(f"{path}:6: ")


@pytest.mark.parametrize("batch", [1, 7])
def test_rotation_bounds_the_disk_and_replay_reads_both_files_in_order(tmp_path, batch):
    path = tmp_path / "records.jsonl"
    written = records(200)
    line_bytes = max(len(json.dumps(r.to_dict())) + 1 for r in written)
    max_bytes = 40 * line_bytes
    log = RecordLog(path, max_bytes=max_bytes)
    previous = path.with_name("records.jsonl.1")
    for start in range(0, len(written), batch):
        log.append(written[start:start + batch])
        assert path.stat().st_size < max_bytes
        assert not previous.exists() or previous.stat().st_size < max_bytes + batch * line_bytes
    log.close()
    assert previous.exists()
    replayed = list(RecordLog(path).replay())
    assert 30 <= len(replayed) < 100
    assert replayed == written[-len(replayed):]  # the newest records, oldest first


def get_json(url: str):
    return urllib.request.urlopen(url, timeout=10).read().decode()


def start_monitor(port: int, record_file, repository, window: int = 100, preexec_fn=None) -> subprocess.Popen:
    """python -m histoserve.monitor serve on `port` (writers' token TOKEN, in a file), returned once /healthz answers."""
    tokens = repository.parent / f"{repository.name}-tokens"
    tokens.write_text(f"# writers\n{TOKEN}\n")
    process = subprocess.Popen([sys.executable, "-m", "histoserve.monitor", "serve", "--repository", str(repository), "--port", str(port),
                                "--window", str(window), "--min-window", "10", "--record-file", str(record_file),
                                "--token-file", str(tokens)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=preexec_fn)
    deadline = time.monotonic() + 60
    while True:
        try:
            get_json(f"http://127.0.0.1:{port}/healthz")
            return process
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
            time.sleep(0.2)


def test_the_monitor_process_keeps_its_window_over_a_restart(tmp_path):
    """python -m histoserve.monitor serve, stopped by SIGTERM (as Kubernetes does) and started again on the same
    record file: its window metric says the records are still there."""
    port, record_file = free_ports().http, tmp_path / "records.jsonl"
    repository = holding(tmp_path / "models", ("digits", "1"))
    sent = [r.to_dict() for r in records(60)]
    process = start_monitor(port, record_file, repository)
    try:
        assert post(port, sent)["accepted"] == 60
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    assert process.returncode == 0
    process = start_monitor(port, record_file, repository)
    try:
        metrics = get_json(f"http://127.0.0.1:{port}/metrics")
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
    assert 'histoserve_monitor_window_records{model="digits",version="1"} 60.0' in metrics
    assert "monitor: 60 record(s) replayed" in output


def limit_file_size(max_bytes: int):
    """For the child: files may not grow past `max_bytes` (a write past it fails with EFBIG, as on a
    full disk it fails with ENOSPC) instead of killing the process with SIGXFSZ."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


def test_a_record_file_that_cannot_grow_costs_the_history_not_the_windows(tmp_path):
    """The record file hits a real limit of the OS part-way: every POST is still accepted and judged,
    the records it could not keep are counted, and the file holds only whole lines."""
    port, record_file = free_ports().http, tmp_path / "records.jsonl"
    batches = [[r.to_dict() for r in records(20, seed=seed)] for seed in range(10)]
    limit = 4 * len("".join(json.dumps(r) + "\n" for r in batches[0]))  # room for about 4 of the 10 batches
    repository = holding(tmp_path / "models", ("digits", "1"))
    process = start_monitor(port, record_file, repository, window=500, preexec_fn=limit_file_size(limit))
    try:
        for batch in batches:
            assert post(port, batch)["accepted"] == 20
        metrics = get_json(f"http://127.0.0.1:{port}/metrics")
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
    assert 'histoserve_monitor_window_records{model="digits",version="1"} 200.0' in metrics
    kept = [line for line in record_file.read_text().splitlines() if line]
    unwritten = float(re.search(r"^histoserve_monitor_records_unwritten_total (\S+)$", metrics, re.M).group(1))
    assert 0 < unwritten < 200 and len(kept) + unwritten >= 200
    skipped = []
    assert len(list(read_records(record_file, skipped))) == len(kept) - len(skipped) and len(skipped) <= 1
    assert "monitor: cannot write the record file" in output


@pytest.mark.parametrize("trace_id, error", [
    ("4bf92f3577b34da6a3ce929d0e0e4736", None),
    (None, None),
    ("4BF92F3577B34DA6A3CE929D0E0E4736", "trace_id"),  # W3C trace ids are lower-case hex
    ("4bf92f35", "trace_id"),
    (42, "trace_id"),
])
def test_a_records_trace_id_is_32_lower_case_hex_digits_or_null(trace_id, error):
    data = {"model": "digits", "version": "1", "predicted": 3, "max_probability": 0.9,
            "statistics": dict.fromkeys(INPUT_STATISTICS, 1.0), "trace_id": trace_id}
    if error is None:
        assert PredictionRecord.from_dict(data).to_dict() == data
    else:
        with pytest.raises(RecordError, match=error):
            PredictionRecord.from_dict(data)
