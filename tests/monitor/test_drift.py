"""Drift tests and the label-free accuracy estimate on synthetic data with a known answer."""

import numpy as np
import pytest

from histoserve.formats.baseline import build_baseline
from histoserve.formats.image_statistics import input_statistics
from histoserve.monitor.drift import drift_report

CLASSES = [str(c) for c in range(4)]


def calibrated(rng, n, prior=(0.25, 0.25, 0.25, 0.25), sharpness=3.0):
    """Probability rows and labels drawn from them, so the probabilities are calibrated by construction."""
    classes = rng.choice(4, size=n, p=prior)
    logits = rng.normal(0, 1, (n, 4))
    logits[np.arange(n), classes] += sharpness
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(4, p=row) for row in probabilities])
    return probabilities, labels


def images_like(rng, n, brightness=100, spread=30):
    return np.clip(rng.normal(brightness, spread, (n, 3, 16, 16)), 0, 255).astype(np.uint8)


def window_report(baseline, probabilities, images):
    return drift_report(baseline, probabilities.argmax(axis=1), probabilities.max(axis=1), input_statistics(images))


@pytest.fixture(scope="module")
def baseline():
    rng = np.random.default_rng(0)
    probabilities, labels = calibrated(rng, 600)
    return build_baseline("m", "fp32", "test", CLASSES, probabilities, images_like(rng, 600), labels)


def test_windows_from_the_baseline_distribution_rarely_alarm(baseline):
    rng = np.random.default_rng(1)
    alarms = sum(window_report(baseline, calibrated(rng, 200)[0], images_like(rng, 200)).drift for _ in range(200))
    assert alarms / 200 <= 0.075  # Bonferroni keeps the family-wise rate near α = 5 % (seeded: 10 of 200)


@pytest.mark.parametrize("shift, family", [
    ("brighter", "input"),
    ("prior", "prediction"),
    ("less confident", "prediction"),
])
def test_a_shifted_window_is_flagged_by_the_right_family(baseline, shift, family):
    rng = np.random.default_rng(2)
    prior = (0.7, 0.1, 0.1, 0.1) if shift == "prior" else (0.25,) * 4
    probabilities, _ = calibrated(rng, 200, prior, sharpness=1.0 if shift == "less confident" else 3.0)
    images = images_like(rng, 200, brightness=130 if shift == "brighter" else 100)
    report = window_report(baseline, probabilities, images)
    assert getattr(report, f"{family}_drift") and report.drift
    assert all(t.drifted == (t.p_value < report.corrected_alpha) for t in report.tests)
    assert report.corrected_alpha == pytest.approx(0.05 / len(report.tests))


def test_label_free_accuracy_tracks_the_true_accuracy_of_calibrated_predictions(baseline):
    rng = np.random.default_rng(3)
    for sharpness in (1.0, 3.0):
        probabilities, labels = calibrated(rng, 2000, sharpness=sharpness)
        report = window_report(baseline, probabilities, images_like(rng, 2000))
        true = float((probabilities.argmax(axis=1) == labels).mean())
        assert abs(report.estimated_accuracy - true) < 0.03
        assert report.estimated_accuracy_low <= true <= report.estimated_accuracy_high
    assert report.accuracy_dropped is False
    lower = window_report(baseline, calibrated(rng, 500, sharpness=0.5)[0], images_like(rng, 500))
    assert lower.accuracy_dropped and lower.estimated_accuracy < baseline.expected_accuracy - 0.05
