"""The open-loop load as plain objects, testable without Locust: each generator process's share of the
offered rate and its measurement windows (OpenLoop), and the master's book of every process's
windows, merged, with the warm-up left out and stability judged (WindowBook). The locustfile wires
them to Locust's runner, messages and events.
"""

from __future__ import annotations

from histoserve.loadtest.arrivals import ArrivalSchedule
from histoserve.loadtest.windows import Window, WindowClock, stable


class OpenLoop:
    """One process's part of the load: its arrival schedule (open loop only) and its windows."""

    def __init__(self, window_s: float, arrival_rate: float = 0.0, distribution: str = "poisson", worker_index: int = 0):
        self.clock = WindowClock(window_s)
        self.worker_index = max(0, worker_index)
        self.schedule = (ArrivalSchedule(arrival_rate, distribution, seed=self.worker_index) if arrival_rate > 0 else None)

    @staticmethod
    def share(process_users: int, total_users: int) -> float:
        """The part of the offered rate a process sends: its users ÷ all users (at least one each)."""
        return min(1.0, max(1, process_users) / max(1, total_users))

    def next_send(self, now: float, process_users: int, total_users: int) -> float:
        """The intended time of this process's next request. Worker processes share the rate by their
        users and start their constant-rate phases apart, so their sends interleave."""
        self.schedule.share = self.share(process_users, total_users)
        self.schedule.offset = self.worker_index * self.schedule.share % 1.0
        return self.schedule.take(now)

    def closed_windows(self, now: float, generator_cpu: float) -> list[Window]:
        """Windows that ended before `now`, each stamped with this process's CPU use."""
        closed = self.clock.closed(now)
        for window in closed:
            window.generator_cpu = generator_cpu
        return closed


class WindowBook:
    """On the master (or the only process): every process's windows merged, in order, and whether the
    load is stable. Windows that began before every user was running are warm-up."""

    def __init__(self, stable_windows: int = 3, tolerance: float = 0.1, open_loop: bool = False):
        self.stable_windows, self.tolerance, self.open_loop = stable_windows, tolerance, open_loop
        self.pending: dict[float, Window] = {}
        self.windows: list[Window] = []
        self.measuring_from: float | None = None
        self.stable_at: int | None = None

    def add(self, window: Window, reporters: int = 1) -> bool:
        """Count a process's window; once all `reporters` sent theirs for that time, book it. True when
        the load has just become stable."""
        if window.start in self.pending:
            window = self.pending.pop(window.start).merge(window)
        if window.reporters < reporters:
            self.pending[window.start] = window
            return False
        if self.measuring_from is None or window.start < self.measuring_from:
            return False
        self.windows.append(window)
        if self.stable_at is None and stable(self.windows, self.stable_windows, self.tolerance, open_loop=self.open_loop):
            self.stable_at = len(self.windows)
            return True
        return False

    def measured(self, stop_when_stable: bool) -> list[Window]:
        """With --stop-when-stable, the windows that were found stable (or every window, when the load
        never settled); otherwise every window after the warm-up: a run of fixed length reports all of
        it, a stall after a stable start included."""
        if stop_when_stable and self.stable_at is not None:
            return self.windows[self.stable_at - self.stable_windows:self.stable_at]
        return self.windows
