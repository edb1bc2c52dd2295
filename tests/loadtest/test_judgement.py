"""The run's verdict from plain numbers (loadtest/judgement.py): no Locust needed."""

import pytest

from histoserve.loadtest.judgement import (
    GENERATOR_CPU,
    LATE,
    LOST_WORKERS,
    NO_WINDOW,
    NOTHING_SENT,
    RunFacts,
    Thresholds,
    exit_code,
    invalid_reasons,
    threshold_failures,
)

MEASURED = {"late_share": 0.0, "generator_cpu": 20.0}


@pytest.mark.parametrize("facts, codes", [
    (RunFacts(requests=100), []),
    (RunFacts(requests=0), [NOTHING_SENT]),
    (RunFacts(requests=100, lost_workers=1, expected_workers=4), [LOST_WORKERS]),
    (RunFacts(requests=100, arrival_rate=20), [NO_WINDOW]),
    (RunFacts(requests=100, arrival_rate=20, measured=MEASURED), []),
    (RunFacts(requests=100, arrival_rate=20, measured={**MEASURED, "late_share": 0.02}), [LATE]),
    (RunFacts(requests=100, arrival_rate=20, measured={**MEASURED, "late_share": 0.01}), []),  # at the limit
    (RunFacts(requests=100, arrival_rate=20, measured={**MEASURED, "generator_cpu": 95.0}), [GENERATOR_CPU]),
    (RunFacts(requests=100, measured={**MEASURED, "late_share": 0.5}), []),  # closed loop: no schedule to be late for
], ids=["valid", "nothing-sent", "lost-worker", "no-window", "open-valid", "late", "at-limit", "cpu", "closed-loop"])
def test_invalid_reasons_carry_codes_the_sweep_reads(facts, codes):
    reasons = invalid_reasons(facts)
    assert [r.code for r in reasons] == codes
    assert all(r.message for r in reasons)


def test_the_late_message_says_what_to_do():
    [reason] = invalid_reasons(RunFacts(requests=10, arrival_rate=25, measured={**MEASURED, "late_share": 0.2}))
    assert "could not keep the offered 25 req/s" in reason.message and "20.0% of requests" in reason.message


@pytest.mark.parametrize("thresholds, p99, ratio, failures", [
    (Thresholds(), 900, 0.5, 0),
    (Thresholds(fail_p99_ms=500), 499, 0, 0), (Thresholds(fail_p99_ms=500), 501, 0, 1),
    (Thresholds(fail_ratio=0.01), 10, 0.01, 0), (Thresholds(fail_ratio=0.01), 10, 0.02, 1),
    (Thresholds(fail_p99_ms=500, fail_ratio=0), 600, 0.1, 2),
])
def test_thresholds(thresholds, p99, ratio, failures):
    assert len(threshold_failures(thresholds, p99, ratio)) == failures


@pytest.mark.parametrize("preset, invalid, failed, thresholds, code", [
    (None, [], [], Thresholds(), None),            # Locust decides: 1 on any failed request
    (None, [object()], [], Thresholds(), 4),
    (2, [object()], [], Thresholds(), 2),          # nothing can be measured says more than invalid
    (None, [], ["p99"], Thresholds(fail_p99_ms=1), 3),
    (1, [], [], Thresholds(fail_ratio=0.1), 0),    # failures within the allowed ratio pass
    (1, [], [], Thresholds(fail_p99_ms=500), 1),
])
def test_exit_codes(preset, invalid, failed, thresholds, code):
    assert exit_code(preset, invalid, failed, thresholds) == code
