"""Open-loop arrivals: when each request is *meant* to be sent, whatever the server is doing.

A closed-loop user sends its next request when the last one returns, so a slow server is sent less
and its latency looks better than what callers live through (coordinated omission). Here the send
times are fixed in advance by the offered rate; a request that goes out after its intended time
(every user busy, or the generator's CPU saturated) is *late*, and its response latency is counted
from the intended time.

The offered rate is shared by every Locust process: each process takes the part of it that its
users are of all users. Poisson arrivals split that way stay Poisson with the total rate (a sum of
independent Poisson processes is one); constant arrivals are offset by the worker index so that
processes do not send in lockstep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

DISTRIBUTIONS = ("poisson", "constant")


@dataclass
class ArrivalSchedule:
    """Intended send times (in the clock of the caller) for one process's share of `rate` req/s."""

    rate: float
    distribution: str = "poisson"
    share: float = 1.0  # this process's part of the rate, 0 < share <= 1
    offset: float = 0.0  # constant arrivals: this process's phase, as a fraction of its interval
    seed: int | None = None
    _next: float | None = field(default=None, init=False)
    _random: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError(f"arrival rate must be positive, got {self.rate}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"arrival distribution {self.distribution!r} is not one of {DISTRIBUTIONS}")
        self._random = random.Random(self.seed)

    def gap(self) -> float:
        """Seconds from one intended send to the next, at this process's share of the rate."""
        process_rate = self.rate * self.share
        if self.distribution == "poisson":
            return self._random.expovariate(process_rate)
        return 1.0 / process_rate

    def take(self, now: float) -> float:
        """The next intended send time. The first is `now` (plus the phase offset); after that the
        times follow the schedule and never move: a ticket taken late keeps its intended time."""
        if self._next is None:
            self._next = now + (self.offset * self.gap() if self.distribution == "constant" else 0.0)
        intended = self._next
        self._next += self.gap()
        return intended
