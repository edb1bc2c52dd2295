"""The open-loop pieces without Locust (loadtest/open_loop.py): each process's share of the rate and
its send times, and the master's book of merged windows."""

import pytest

from histoserve.loadtest.open_loop import OpenLoop, WindowBook
from histoserve.loadtest.windows import Window


@pytest.mark.parametrize("process_users, total_users, share", [(8, 16, 0.5), (16, 16, 1.0), (0, 16, 1 / 16), (5, 0, 1.0)])
def test_a_process_sends_its_users_share_of_the_rate(process_users, total_users, share):
    assert OpenLoop.share(process_users, total_users) == pytest.approx(share)


def test_constant_arrivals_of_two_workers_interleave():
    first, second = (OpenLoop(5.0, arrival_rate=10, distribution="constant", worker_index=i) for i in (0, 1))
    times = sorted([first.next_send(100.0, 8, 16) for _ in range(5)] + [second.next_send(100.0, 8, 16) for _ in range(5)])
    gaps = [round(b - a, 6) for a, b in zip(times, times[1:], strict=False)]
    assert gaps == [0.1] * 9  # together 10 req/s, evenly spread


def test_a_late_ticket_keeps_its_intended_time():
    loop = OpenLoop(5.0, arrival_rate=4, distribution="constant")
    assert [loop.next_send(now, 1, 1) for now in (0.0, 5.0, 5.0)] == [0.0, 0.25, 0.5]


def test_closed_loop_has_no_schedule_and_windows_carry_the_cpu():
    loop = OpenLoop(1.0)
    assert loop.schedule is None
    loop.clock.at(10.2).sent += 1
    [window] = loop.closed_windows(11.5, generator_cpu=42.0)
    assert (window.start, window.sent, window.generator_cpu) == (10.0, 1, 42.0)


def window(start: float, sent: int = 10, latency_s: float = 0.01, reporters: int = 1) -> Window:
    made = Window(start, 1.0, sent=sent, reporters=reporters)
    for _ in range(sent):
        made.record(latency_s, latency_s)
    return made


def test_the_book_merges_every_reporters_window_before_counting_it():
    book = WindowBook(stable_windows=2, open_loop=True)
    book.measuring_from = 0.0
    assert not book.add(window(1.0), reporters=2) and book.windows == []
    book.add(window(1.0), reporters=2)
    assert [(w.start, w.sent, w.reporters) for w in book.windows] == [(1.0, 20, 2)]


def test_warm_up_windows_are_left_out_and_stability_is_judged_once():
    book = WindowBook(stable_windows=2, open_loop=True)
    book.measuring_from = 2.0
    assert not book.add(window(1.0))               # before every user ran: warm-up
    assert not book.add(window(2.0))
    assert book.add(window(3.0))                   # the second steady window: stable now
    assert not book.add(window(4.0, latency_s=5))  # stays stable; a stall after it is still recorded
    assert book.stable_at == 2 and [w.start for w in book.windows] == [2.0, 3.0, 4.0]
    assert [w.start for w in book.measured(stop_when_stable=True)] == [2.0, 3.0]
    assert [w.start for w in book.measured(stop_when_stable=False)] == [2.0, 3.0, 4.0]
