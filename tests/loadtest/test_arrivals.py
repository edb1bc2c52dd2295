"""Open-loop arrival schedules: the offered rate is kept, shares add up, and a late ticket keeps its time."""

import statistics

import pytest

from histoserve.loadtest.arrivals import ArrivalSchedule


@pytest.mark.parametrize("distribution", ["poisson", "constant"])
@pytest.mark.parametrize("share", [1.0, 0.25])
def test_schedule_offers_its_share_of_the_rate(distribution, share):
    schedule = ArrivalSchedule(rate=200.0, distribution=distribution, share=share, seed=1)
    times = [schedule.take(now=10.0) for _ in range(4000)]
    assert times[0] == 10.0 and times == sorted(times)
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert rate == pytest.approx(200.0 * share, rel=0.05)


def test_poisson_gaps_are_exponential_and_constant_gaps_are_not():
    poisson = ArrivalSchedule(100.0, "poisson", seed=3)
    constant = ArrivalSchedule(100.0, "constant")
    gaps = [poisson.gap() for _ in range(20000)]
    # an exponential distribution's standard deviation equals its mean
    assert statistics.stdev(gaps) == pytest.approx(statistics.fmean(gaps), rel=0.05)
    assert {constant.gap() for _ in range(10)} == {0.01}


def test_a_ticket_taken_late_keeps_its_intended_time():
    """The generator fell behind (every user busy): the schedule does not slide with it."""
    schedule = ArrivalSchedule(10.0, "constant")
    assert schedule.take(now=0.0) == 0.0
    assert schedule.take(now=5.0) == pytest.approx(0.1)
    assert schedule.take(now=5.0) == pytest.approx(0.2)


def test_constant_processes_are_offset_by_their_phase():
    first = ArrivalSchedule(10.0, "constant", share=0.5, offset=0.0)
    second = ArrivalSchedule(10.0, "constant", share=0.5, offset=0.5)
    merged = sorted([first.take(0.0) for _ in range(5)] + [second.take(0.0) for _ in range(5)])
    assert [round(b - a, 6) for a, b in zip(merged, merged[1:], strict=False)] == [0.1] * 9


@pytest.mark.parametrize("rate, distribution", [(0.0, "poisson"), (-1.0, "constant"), (5.0, "uniform")])
def test_bad_schedules_are_refused(rate, distribution):
    with pytest.raises(ValueError):
        ArrivalSchedule(rate, distribution)
