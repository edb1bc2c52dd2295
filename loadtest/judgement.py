"""A load-test run's verdict, from plain numbers: is the run valid at all, did it pass its thresholds,
and with which exit code it ends. The locustfile feeds it; the sweep reads the structured result
(`Invalid.code`) from the summary file rather than the wording.

Exit codes: 0 passed; 1 Locust's own failure (any failed request without --fail-ratio); 2 nothing can
be measured; 3 a threshold failed; 4 the run is not valid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GENERATOR_CPU_LIMIT = 90.0  # percent of one core: Locust's own warning level

# Invalid.code values
NOTHING_SENT, LOST_WORKERS, NO_WINDOW, LATE, GENERATOR_CPU = "nothing_sent", "lost_workers", "no_window", "late", "generator_cpu"


@dataclass(frozen=True)
class Invalid:
    code: str
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RunFacts:
    """What the judgement needs to know about a finished run."""

    requests: int
    arrival_rate: float = 0.0          # 0: closed loop
    lost_workers: int = 0
    expected_workers: int = 0
    measured: dict | None = None       # the measured windows' totals (windows.Window.summary)
    window_s: float = 5.0
    late_ms: float = 10.0
    max_late_share: float = 0.01


def invalid_reasons(run: RunFacts) -> list[Invalid]:
    """Why the run cannot stand for the server's answer to the offered load (empty: it can)."""
    reasons = []
    if run.requests == 0:
        reasons.append(Invalid(NOTHING_SENT, "no request was sent"))
    if run.lost_workers:
        reasons.append(Invalid(LOST_WORKERS, f"{run.lost_workers} of {run.expected_workers} worker(s) lost during the run"))
    open_loop, measured = run.arrival_rate > 0, run.measured
    if open_loop and run.requests and not measured:
        reasons.append(Invalid(NO_WINDOW, f"no {run.window_s:g} s measurement window completed after every user was running "
                                          f"(run for longer, or shorten --window-s)"))
    if open_loop and measured:
        if measured["late_share"] > run.max_late_share:
            reasons.append(Invalid(LATE, (
                f"the generator could not keep the offered {run.arrival_rate:g} req/s: {measured['late_share']:.1%} of "
                f"requests were sent over {run.late_ms:g} ms after their intended time (every user busy: the server is past "
                f"capacity or --users is too low; or the generator's CPU is saturated). Response latency, from the "
                f"intended times, still tells the truth")))
        if measured["generator_cpu"] >= GENERATOR_CPU_LIMIT:
            reasons.append(Invalid(GENERATOR_CPU, f"a Locust process ran at {measured['generator_cpu']:.0f}% CPU: the "
                                                  f"generator, not the server, limits the load (add --processes or workers)"))
    return reasons


@dataclass(frozen=True)
class Thresholds:
    fail_p99_ms: float = 0.0     # 0: no limit
    fail_ratio: float = -1.0     # -1: Locust's own rule (any failure exits 1)

    @property
    def set(self) -> bool:
        return self.fail_p99_ms > 0 or self.fail_ratio >= 0


def threshold_failures(thresholds: Thresholds, p99_ms: float, failure_ratio: float) -> list[str]:
    failures = []
    if thresholds.fail_p99_ms > 0 and p99_ms > thresholds.fail_p99_ms:
        failures.append(f"p99 {p99_ms:.0f} ms > --fail-p99-ms {thresholds.fail_p99_ms:.0f}")
    if thresholds.fail_ratio >= 0 and failure_ratio > thresholds.fail_ratio:
        failures.append(f"failure ratio {failure_ratio:.4f} > --fail-ratio {thresholds.fail_ratio}")
    return failures


def exit_code(preset: int | None, invalid: list[Invalid], failed_thresholds: list[str], thresholds: Thresholds) -> int | None:
    """The run's exit code, given the one already set (2: nothing could be measured) or None, which
    leaves it to Locust (1 on any failed request)."""
    if invalid:
        return 2 if preset == 2 else 4  # "nothing can be measured" says more than "invalid"
    if failed_thresholds:
        return 3
    if thresholds.fail_ratio >= 0:
        return 0  # failures within the allowed ratio do not fail the run
    return preset
