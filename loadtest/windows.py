"""Measurement windows: latencies in HDR histograms (1 µs to 1 h, 3 significant digits), counted per
fixed window of wall-clock time, merged across Locust processes, and judged stable by
perf_analyzer's rule (the last 3 windows within 10 % of their mean on throughput and latency; in open
loop, completing what was sent instead of an equal throughput).

Each request is counted in the window in which it *completed*; `sent` and `late` in the window in
which it was sent. Two latencies per request: *service* (from the moment it was actually sent) and
*response* (from its intended send time: corrected for coordinated omission; the same as service in
closed loop).
"""

from __future__ import annotations

import base64
import statistics
from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram

LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS = 1, 3_600_000_000, 3
PERCENTILES = (50, 90, 99, 99.9)


def histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


@dataclass
class Window:
    start: float  # wall-clock seconds, a multiple of `length`
    length: float
    service: HdrHistogram = field(default_factory=histogram)
    response: HdrHistogram = field(default_factory=histogram)
    sent: int = 0
    late: int = 0
    failures: int = 0
    mismatches: int = 0
    generator_cpu: float = 0.0  # the busiest Locust process, percent of one core
    reporters: int = 1
    # Running sums for the means: hdrh's get_mean_value walks every bucket in Python (about 30 ms),
    # long enough to hold up the gevent loop that sends the requests.
    service_sum_us: int = 0
    response_sum_us: int = 0

    @property
    def completed(self) -> int:
        return self.service.get_total_count()

    def record(self, service_s: float, response_s: float) -> None:
        service_us = max(LOWEST_US, min(HIGHEST_US, round(service_s * 1e6)))
        response_us = max(LOWEST_US, min(HIGHEST_US, round(response_s * 1e6)))
        self.service.record_value(service_us)
        self.response.record_value(response_us)
        self.service_sum_us += service_us
        self.response_sum_us += response_us

    def mean_response_us(self) -> float:
        return self.response_sum_us / self.completed if self.completed else 0.0

    def merge(self, other: Window) -> Window:
        self.service.add(other.service)
        self.response.add(other.response)
        self.sent += other.sent
        self.late += other.late
        self.failures += other.failures
        self.mismatches += other.mismatches
        self.generator_cpu = max(self.generator_cpu, other.generator_cpu)
        self.reporters += other.reporters
        self.service_sum_us += other.service_sum_us
        self.response_sum_us += other.response_sum_us
        return self

    def to_message(self) -> dict:
        """A plain dict Locust can send from a worker to its master (histograms HDR-encoded)."""
        counts = {k: getattr(self, k) for k in ("start", "length", "sent", "late", "failures", "mismatches", "generator_cpu",
                                                 "service_sum_us", "response_sum_us")}
        return {**counts, "service": _encode(self.service), "response": _encode(self.response)}

    @classmethod
    def from_message(cls, data: dict) -> Window:
        window = cls(data["start"], data["length"], sent=data["sent"], late=data["late"], failures=data["failures"],
                     mismatches=data["mismatches"], generator_cpu=data["generator_cpu"],
                     service_sum_us=data["service_sum_us"], response_sum_us=data["response_sum_us"])
        window.service.decode_and_add(base64.b64decode(data["service"]))
        window.response.decode_and_add(base64.b64decode(data["response"]))
        return window

    def summary(self, duration: float | None = None) -> dict:
        """Rates over `duration` (default: the window's length); latencies in ms at µs resolution."""
        duration = duration or self.length
        result = {
            "start": self.start, "seconds": duration, "sent": self.sent, "completed": self.completed,
            "failures": self.failures, "mismatches": self.mismatches,
            "sent_per_s": self.sent / duration, "completed_per_s": self.completed / duration,
            "late_share": self.late / self.sent if self.sent else 0.0, "generator_cpu": self.generator_cpu,
        }
        for name, values in (("service", self.service), ("response", self.response)):
            result[f"{name}_mean_ms"] = getattr(self, f"{name}_sum_us") / self.completed / 1000 if self.completed else None
            for q in PERCENTILES:
                result[f"{name}_p{q:g}_ms"] = values.get_value_at_percentile(q) / 1000 if self.completed else None
            result[f"{name}_max_ms"] = values.get_max_value() / 1000 if self.completed else None
        return result


def _encode(values: HdrHistogram) -> str:
    return base64.b64encode(values.encode()).decode("ascii")


class WindowClock:
    """One process's windows, keyed by start; `closed(now)` hands over those that have ended."""

    def __init__(self, length: float):
        if length <= 0:
            raise ValueError(f"window length must be positive, got {length}")
        self.length = length
        self.windows: dict[float, Window] = {}

    def at(self, wall: float) -> Window:
        start = (wall // self.length) * self.length
        if start not in self.windows:
            self.windows[start] = Window(start, self.length)
        return self.windows[start]

    def closed(self, now: float) -> list[Window]:
        ended = sorted(start for start in self.windows if start + self.length <= now)
        return [self.windows.pop(start) for start in ended]


def stable(windows: list[Window], count: int = 3, tolerance: float = 0.1, open_loop: bool = False) -> bool:
    """perf_analyzer's rule: over the last `count` windows, throughput and mean response latency each
    within ±tolerance of their mean. In open loop the throughput follows the arrivals, whose Poisson
    noise alone exceeds 10 % in a window of under 100 requests, so there each window must instead
    complete what it sent, within the tolerance. An overloaded server, whose latency keeps growing, is
    never stable."""
    if len(windows) < count or count < 1:
        return False
    last = windows[-count:]
    if any(w.completed == 0 for w in last):
        return False
    if open_loop:
        if any(abs(w.completed - w.sent) > tolerance * w.sent for w in last):
            return False
        series = [[w.mean_response_us() for w in last]]
    else:
        series = [[w.completed for w in last], [w.mean_response_us() for w in last]]
    for values in series:
        mean = statistics.fmean(values)
        if any(abs(v - mean) > tolerance * mean for v in values):
            return False
    return True


def merged(windows: list[Window]) -> Window:
    """The windows as one (counts summed, histograms added); its length is their total length."""
    if not windows:
        raise ValueError("no windows to merge")
    total = Window(windows[0].start, sum(w.length for w in windows), reporters=0)
    for window in windows:
        total.merge(window)
    return total
