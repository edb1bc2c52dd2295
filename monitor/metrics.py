"""The monitor's Prometheus metrics, in a registry of their own (monitor/service.py's docstring lists
them): what a window's drift report sets, and how a model version's series are dropped with it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from histoserve.monitor.drift import DriftReport

LABELS = ["model", "version"]
REJECT_REASONS = ("malformed", "unknown_version")


class MonitorMetrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.records = Counter("histoserve_monitor_records", "Prediction records received", LABELS, registry=registry)
        self.rejected = Counter("histoserve_monitor_records_rejected", "Records refused: malformed, or for a model version "
                                "the repository does not hold", ["reason"], registry=registry)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        self.unauthorized = Counter("histoserve_monitor_unauthorized_requests", "POSTs refused for a missing or wrong "
                                    "bearer token", registry=registry)
        self.evicted = Counter("histoserve_monitor_windows_evicted", "Model versions dropped to keep at most max_windows",
                               registry=registry)
        self.unwritten = Counter("histoserve_monitor_records_unwritten", "Records the windows took but the record file "
                                 "could not keep (disk full?)", registry=registry)
        self.window_records = Gauge("histoserve_monitor_window_records", "Records in the sliding window", LABELS,
                                    registry=registry)
        self.missing = Gauge("histoserve_monitor_baseline_missing", "1: no readable drift baseline for this version", LABELS,
                             registry=registry)
        self._drift_gauges(registry)

    def _drift_gauges(self, registry: CollectorRegistry) -> None:
        self.p_value = Gauge("histoserve_drift_p_value", "p-value of each drift test, window vs baseline",
                             [*LABELS, "test", "kind"], registry=registry)
        self.detected = Gauge("histoserve_drift_detected", "1: the test rejects 'no drift' at the Bonferroni-corrected level",
                              [*LABELS, "test", "kind"], registry=registry)
        self.prediction_drift = Gauge("histoserve_prediction_drift", "1: predicted classes or confidence drifted", LABELS,
                                      registry=registry)
        self.input_drift = Gauge("histoserve_input_drift", "1: an input statistic drifted", LABELS, registry=registry)
        self.accuracy = Gauge("histoserve_estimated_accuracy", "Label-free accuracy estimate (mean calibrated top-1 probability)",
                              LABELS, registry=registry)
        self.accuracy_low = Gauge("histoserve_estimated_accuracy_low", "Lower end of its 95% interval", LABELS, registry=registry)
        self.accuracy_high = Gauge("histoserve_estimated_accuracy_high", "Upper end of its 95% interval", LABELS,
                                   registry=registry)
        self.expected = Gauge("histoserve_baseline_expected_accuracy", "The same estimate on the baseline split", LABELS,
                              registry=registry)
        self.accuracy_drop = Gauge("histoserve_accuracy_drop", "1: the estimate fell more than the allowed drop under the baseline's",
                                   LABELS, registry=registry)

    def per_version(self) -> tuple:
        """The metrics labelled by model and version alone."""
        return (self.records, self.window_records, self.missing, self.prediction_drift, self.input_drift, self.accuracy,
                self.accuracy_low, self.accuracy_high, self.expected, self.accuracy_drop)

    def set_window(self, key: tuple[str, str], records: int, baseline_missing: bool) -> None:
        self.window_records.labels(*key).set(records)
        self.missing.labels(*key).set(baseline_missing)

    def set_report(self, key: tuple[str, str], report: DriftReport) -> set[tuple[str, str]]:
        """The report's values for this model version; returns the (test, kind) series it set."""
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
        return {(test.name, test.kind) for test in report.tests}

    def forget(self, key: tuple[str, str], tested: set[tuple[str, str]]) -> None:
        """Drop a model version's series: those labelled by it alone, and its `tested` (test, kind) ones."""
        for metric in self.per_version():
            try:
                metric.remove(*key)
            except KeyError:
                pass
        for test, kind in tested:
            for metric in (self.p_value, self.detected):
                try:
                    metric.remove(*key, test, kind)
                except KeyError:
                    pass
