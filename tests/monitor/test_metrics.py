"""The monitor's parts on their own: its metrics without a Monitor, its restore step, and the
repository's name rules it checks records with (formats/repository_layout.py)."""

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from histoserve.formats.records import records_for
from histoserve.formats.repository_layout import is_version_name
from histoserve.monitor.drift import DriftReport, DriftTest
from histoserve.monitor.metrics import MonitorMetrics
from histoserve.monitor.service import Monitor, why_not_held

KEY = ("digits", "3")


def samples(metrics: MonitorMetrics) -> dict[tuple, float]:
    text = generate_latest(metrics.registry).decode()
    return {(sample.name, *sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def report(drifted: bool) -> DriftReport:
    tests = [DriftTest("predicted_class", "prediction", 3.0, 0.001 if drifted else 0.5, drifted),
             DriftTest("brightness", "input", 1.0, 0.4, False)]
    return DriftReport(window_size=100, alpha=0.01, corrected_alpha=0.005, tests=tests, estimated_accuracy=0.9,
                       estimated_accuracy_low=0.85, estimated_accuracy_high=0.95, baseline_expected_accuracy=0.97,
                       accuracy_dropped=drifted)


def test_the_metrics_alone_export_a_report_and_forget_a_version_with_all_its_series():
    metrics = MonitorMetrics()
    labels = (("model", "digits"), ("version", "3"))
    before = samples(metrics)
    assert before[("histoserve_monitor_records_rejected_total", ("reason", "malformed"))] == 0  # known reasons from the start
    assert before[("histoserve_monitor_records_rejected_total", ("reason", "unknown_version"))] == 0
    metrics.records.labels(*KEY).inc(7)
    metrics.set_window(KEY, 100, baseline_missing=False)
    tested = metrics.set_report(KEY, report(drifted=True))
    assert tested == {("predicted_class", "prediction"), ("brightness", "input")}
    seen = samples(metrics)
    assert seen[("histoserve_monitor_records_total", *labels)] == 7
    assert seen[("histoserve_monitor_window_records", *labels)] == 100
    assert seen[("histoserve_drift_detected", ("kind", "prediction"), *labels[:1], ("test", "predicted_class"), *labels[1:])] == 1
    assert seen[("histoserve_prediction_drift", *labels)] == 1 and seen[("histoserve_input_drift", *labels)] == 0
    assert seen[("histoserve_estimated_accuracy_low", *labels)] == 0.85
    assert seen[("histoserve_accuracy_drop", *labels)] == 1
    metrics.forget(KEY, tested)
    assert not [key for key in samples(metrics) if ("version", "3") in key]


def test_restore_replays_the_record_file_into_the_windows(tmp_path):
    repository = tmp_path / "models"
    (repository / "digits" / "1").mkdir(parents=True)
    rng = np.random.default_rng(0)
    kept = records_for("digits", "1", rng.integers(0, 256, (12, 3, 8, 8), dtype=np.uint8), rng.integers(0, 10, 12),
                       rng.uniform(0.1, 1.0, 12).round(6))
    first = Monitor(repository, window=10, min_window=5, record_file=tmp_path / "records.jsonl")
    first.add(kept)
    first.record_log.close()
    second = Monitor(repository, window=10, min_window=5, record_file=tmp_path / "records.jsonl")
    assert second.windows == {} and second.restored == 0
    second.restore()
    assert second.restored == 12 and list(second.windows[("digits", "1")]) == kept[-10:]
    second.record_log.close()


@pytest.mark.parametrize("name, rule", [
    ("1", True), ("12", True), ("9999999999999999999", True),
    ("0", False), ("01", False), ("", False), ("1.0", False), ("-1", False), (" 1", False), ("1\n", False),
    ("\u0661", False), ("\u00b2", False), (".staging-1", False),
])
def test_one_version_name_rule_for_the_repository_and_the_monitor(tmp_path, name, rule):
    (tmp_path / "digits" / "1").mkdir(parents=True)
    assert is_version_name(name) is rule
    refused = why_not_held(tmp_path, "digits", name)
    assert (refused is None or "not a version number" not in refused) is rule, refused


def test_the_monitor_bounds_the_repository_s_names_it_builds_paths_from(tmp_path):
    assert "not a version number" in why_not_held(tmp_path, "digits", "1" * 20)
    assert "not a model name" in why_not_held(tmp_path, "a" * 129, "1")
    assert "not a model name" in why_not_held(tmp_path, "a..b", "1")
    assert "not a model name" in why_not_held(tmp_path, "digits\n", "1")
    assert "is not in the model repository" in why_not_held(tmp_path, "digits", "1")
