"""Is a window of live predictions different from the baseline? Black-box shift detection on the
classifier's outputs and inputs (after Rabanser et al., *Failing Loudly*, 2019), with scipy's tests:

- prediction drift: chi-square test of homogeneity on predicted-class counts, baseline vs window
  (`scipy.stats.chi2_contingency`; classes neither side predicted are left out), and two-sample
  Kolmogorov–Smirnov on the top-1 probability (`scipy.stats.ks_2samp`);
- input drift: two-sample KS on each input statistic (image_statistics.py);
- multiple tests: Bonferroni. Every test runs at α ÷ m (m = 2 + the number of input statistics), so the
  chance that a window from the baseline's own distribution raises any alarm is at most α.

Label-free accuracy (CBPE, as in NannyML): with calibrated probabilities, a prediction whose top-1
probability is p is right with probability p, so the expected accuracy of a window is the mean top-1
probability, and its variance Σ p(1 − p) ÷ n² (a Poisson binomial); the interval is ±1.96 σ. This holds
under covariate shift while calibration holds, not under concept shift: a shift that keeps the model
confident but wrong is caught, if at all, by the drift tests. An accuracy drop is flagged when the
estimate falls more than `max_accuracy_drop` under the baseline's own expected accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats

from histoserve.formats.baseline import DriftBaseline
from histoserve.formats.image_statistics import INPUT_STATISTICS
from histoserve.formats.records import PredictionRecord

ALPHA = 0.05
MAX_ACCURACY_DROP = 0.05


@dataclass(frozen=True)
class DriftTest:
    name: str  # "predicted_class", "max_probability" or an input statistic
    kind: str  # "prediction" or "input"
    statistic: float
    p_value: float
    drifted: bool


@dataclass(frozen=True)
class DriftReport:
    window_size: int
    alpha: float
    corrected_alpha: float  # per test, after Bonferroni
    tests: list[DriftTest]
    estimated_accuracy: float
    estimated_accuracy_low: float
    estimated_accuracy_high: float
    baseline_expected_accuracy: float
    accuracy_dropped: bool
    # Requests to follow up (records_report): the traces of the window's least confident traced
    # predictions, where a drifting window's odd images are likeliest. Empty when nothing was traced.
    trace_ids: tuple[str, ...] = ()

    @property
    def prediction_drift(self) -> bool:
        return any(t.drifted for t in self.tests if t.kind == "prediction")

    @property
    def input_drift(self) -> bool:
        return any(t.drifted for t in self.tests if t.kind == "input")

    @property
    def drift(self) -> bool:
        return self.prediction_drift or self.input_drift or self.accuracy_dropped


def drift_report(baseline: DriftBaseline, predicted: np.ndarray, max_probability: np.ndarray,
                 statistics: dict[str, np.ndarray], alpha: float = ALPHA,
                 max_accuracy_drop: float = MAX_ACCURACY_DROP) -> DriftReport:
    """Compare one window (predicted class indices, top-1 probabilities and input statistics, one
    value per prediction) with the baseline."""
    predicted, max_probability = np.asarray(predicted), np.asarray(max_probability, dtype=np.float64)
    n = len(predicted)
    if n == 0 or len(max_probability) != n:
        raise ValueError(f"a window needs predictions and as many top-1 probabilities, got {n} and {len(max_probability)}")
    names = [name for name in INPUT_STATISTICS if name in statistics]
    corrected = alpha / (2 + len(names))
    tests = [class_test(baseline, predicted, corrected)]
    result = stats.ks_2samp(baseline.max_probability, max_probability)
    tests.append(DriftTest("max_probability", "prediction", float(result.statistic), float(result.pvalue), bool(result.pvalue < corrected)))
    for name in names:
        result = stats.ks_2samp(baseline.input_statistics[name], np.asarray(statistics[name], dtype=np.float64))
        tests.append(DriftTest(name, "input", float(result.statistic), float(result.pvalue), bool(result.pvalue < corrected)))
    estimate = float(max_probability.mean())
    sigma = math.sqrt(float((max_probability * (1 - max_probability)).sum())) / n
    return DriftReport(
        window_size=n, alpha=alpha, corrected_alpha=corrected, tests=tests,
        estimated_accuracy=estimate, estimated_accuracy_low=max(0.0, estimate - 1.96 * sigma),
        estimated_accuracy_high=min(1.0, estimate + 1.96 * sigma),
        baseline_expected_accuracy=baseline.expected_accuracy,
        accuracy_dropped=bool(estimate < baseline.expected_accuracy - max_accuracy_drop),
    )


TRACES_PER_WINDOW = 5


def records_report(baseline: DriftBaseline, records: list[PredictionRecord], alpha: float = ALPHA,
                   max_accuracy_drop: float = MAX_ACCURACY_DROP) -> DriftReport:
    """`drift_report` of a window of prediction records (what the service and the offline report hold),
    with the trace ids of up to TRACES_PER_WINDOW of its traced requests, least confident first."""
    report = drift_report(baseline, np.array([r.predicted for r in records]), np.array([r.max_probability for r in records]),
                          {name: np.array([r.statistics[name] for r in records]) for name in INPUT_STATISTICS},
                          alpha, max_accuracy_drop)
    traced = sorted((r for r in records if r.trace_id), key=lambda r: r.max_probability)
    return replace(report, trace_ids=tuple(dict.fromkeys(r.trace_id for r in traced))[:TRACES_PER_WINDOW])


def class_test(baseline: DriftBaseline, predicted: np.ndarray, corrected_alpha: float) -> DriftTest:
    window = np.bincount(predicted, minlength=len(baseline.class_names))[: len(baseline.class_names)]
    table = np.array([baseline.predicted_counts, window])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:  # one class only on both sides: nothing to compare
        return DriftTest("predicted_class", "prediction", 0.0, 1.0, False)
    result = stats.chi2_contingency(table)
    return DriftTest("predicted_class", "prediction", float(result.statistic), float(result.pvalue),
                     bool(result.pvalue < corrected_alpha))
