"""How the sweep turns steps into a capacity and a knee (pure: the steps are made here)."""

import pytest

from histoserve.loadtest.sweep import Step, capacity, first_miss, mark_knee


def steps(*rows):
    """(offered, meets the SLO, response p99 ms, completed ÷ sent)"""
    made = []
    for offered, meets, p99, kept in rows:
        made.append(Step(offered, 16, 0, sent=offered, completed=offered * kept, response_p99_ms=p99, meets_slo=meets))
    return made


@pytest.mark.parametrize("rows, expected", [
    ([(5, True, 100, 1), (10, True, 200, 1), (15, False, 900, 1)], 10),
    ([(5, True, 100, 1), (10, False, 700, 1), (15, True, 450, 1)], 5),   # a pass above a miss is noise
    ([(5, False, 900, 1), (10, False, 950, 1)], 0),
    ([(5, True, 100, 1), (10, True, 120, 1)], 10),                       # never missed: the highest step
])
def test_capacity_is_the_highest_pass_below_the_first_miss(rows, expected):
    assert capacity(steps(*rows)) == expected


def test_first_miss_without_a_miss_is_infinite():
    assert first_miss(steps((5, True, 100, 1))) == float("inf")


@pytest.mark.parametrize("rows, knee", [
    ([(5, True, 100, 1), (10, True, 150, 1), (15, True, 400, 1)], 15),   # p99 more than doubled
    ([(5, True, 100, 1), (10, True, 150, 0.8), (15, False, 400, 0.7)], 10),  # stopped keeping up
    ([(5, True, 100, 1), (10, True, 150, 1)], None),
])
def test_the_knee_is_where_latency_jumps_or_the_server_falls_behind(rows, knee):
    made = steps(*rows)
    mark_knee(made)
    assert [s.offered for s in made if s.knee] == ([knee] if knee else [])


@pytest.mark.parametrize("codes, keeps_up, generator_limited", [
    ([], True, False), (["late"], False, False), (["generator_cpu"], True, True), (["late", "generator_cpu"], False, True),
])
def test_a_step_reads_the_runs_structured_verdict_not_its_wording(codes, keeps_up, generator_limited):
    step = Step(10, 16, 4, sent=10, completed=10, invalid=[{"code": code, "message": "reworded at will"} for code in codes])
    assert (step.keeps_up, step.generator_limited) == (keeps_up, generator_limited)
