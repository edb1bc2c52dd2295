"""HDR measurement windows: µs resolution, lossless merge across processes, perf_analyzer's stability rule."""

import pytest

from histoserve.loadtest.windows import Window, WindowClock, merged, stable


def window(start: float, latencies_ms: list[float], length: float = 1.0, **counts) -> Window:
    result = Window(start, length, **counts)
    for value in latencies_ms:
        result.record(value / 1000, value / 1000)
    return result


def test_percentiles_have_microsecond_resolution_above_100_ms():
    """Locust's own buckets round 123.456 ms to 120; the HDR histogram keeps 3 significant digits."""
    summary = window(0, [123.456] * 100).summary()
    assert summary["service_p99_ms"] == pytest.approx(123.456, rel=1e-3)
    assert summary["service_p50_ms"] == pytest.approx(123.456, rel=1e-3)


def test_a_window_crosses_the_wire_and_merges_without_loss():
    first = window(10, [1, 2, 3], sent=4, late=1, failures=1, generator_cpu=20)
    second = window(10, [100, 200], sent=2, late=0, generator_cpu=70)
    total = Window.from_message(first.to_message()).merge(Window.from_message(second.to_message()))
    assert (total.completed, total.sent, total.late, total.failures, total.reporters) == (5, 6, 1, 1, 2)
    assert total.generator_cpu == 70
    assert total.summary()["service_max_ms"] == pytest.approx(200, rel=1e-3)
    assert total.summary()["late_share"] == pytest.approx(1 / 6)


def test_service_and_response_latency_are_kept_apart():
    late = Window(0, 1.0)
    late.record(0.010, 0.510)  # served in 10 ms, but sent 500 ms after its intended time
    summary = late.summary()
    assert summary["service_p99_ms"] == pytest.approx(10, rel=1e-3)
    assert summary["response_p99_ms"] == pytest.approx(510, rel=1e-3)


def test_clock_hands_over_only_windows_that_have_ended():
    clock = WindowClock(5.0)
    clock.at(101.0).sent += 1
    clock.at(104.9).sent += 1
    clock.at(106.0).sent += 1
    assert clock.closed(now=104.0) == []
    [ended] = clock.closed(now=105.0)
    assert (ended.start, ended.sent) == (100.0, 2)
    assert [w.start for w in clock.closed(now=111.0)] == [105.0]


@pytest.mark.parametrize("throughputs, latencies, expected", [
    ([100, 100, 100], [10, 10, 10], True),
    ([50, 100, 104, 96], [10, 10, 10.5, 9.6], True),     # only the last 3 count
    ([100, 100, 80], [10, 10, 10], False),                # throughput off by 20 %
    ([100, 100, 100], [10, 20, 40], False),               # latency still growing: an overloaded server
    ([100, 100], [10, 10], False),                        # too few windows
])
def test_perf_analyzer_stability_rule(throughputs, latencies, expected):
    windows = [window(i, [latency] * count) for i, (count, latency) in enumerate(zip(throughputs, latencies, strict=True))]
    assert stable(windows, count=3, tolerance=0.1) is expected


def test_merged_windows_report_rates_over_their_total_length():
    total = merged([window(0, [5] * 10, length=2.0), window(2, [5] * 30, length=2.0)])
    assert total.summary()["completed_per_s"] == pytest.approx(10.0)


@pytest.mark.parametrize("sent, completed, latencies, expected", [
    ([40, 55, 47], [41, 54, 47], [60, 62, 58], True),    # Poisson arrivals: counts vary, every window keeps up
    ([40, 55, 47], [41, 40, 47], [60, 62, 58], False),   # one window completed far less than it sent
    ([40, 55, 47], [41, 54, 47], [60, 90, 140], False),  # latency growing
])
def test_open_loop_stability_follows_what_was_sent(sent, completed, latencies, expected):
    rows = enumerate(zip(sent, completed, latencies, strict=True))
    windows = [window(i, [latency] * done, sent=count) for i, (count, done, latency) in rows]
    assert stable(windows, count=3, tolerance=0.1, open_loop=True) is expected
