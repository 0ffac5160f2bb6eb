"""The per-second rings behind the admin's rates and chart, on a clock the test moves."""

from __future__ import annotations

import pytest

from roomcast.engine.rates import Counts, Level


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_counts_rate_is_over_the_last_whole_seconds() -> None:
    clock = Clock()
    counts = Counts(10, clock)
    for _ in range(10):  # 10 seconds of 30 events each
        counts.add(30)
        clock.now += 1
    assert counts.per_second(10) == 30.0
    counts.add(500)  # the current second is not whole yet: not in the rate
    assert counts.per_second(10) == 30.0
    clock.now += 1
    assert counts.per_second(10) == (9 * 30 + 500) / 10


def test_counts_fall_back_to_zero_once_the_window_has_passed() -> None:
    clock = Clock()
    counts = Counts(10, clock)
    counts.add(7)
    clock.now += 1
    assert counts.last(3) == (int(clock.now), [0, 0, 7])
    clock.now += 10
    assert counts.per_second(10) == 0.0
    clock.now += 1000  # a long idle stretch clears every slot
    counts.add(1)
    assert counts.per_second(10) == 0.0


def test_a_clock_stepping_back_stays_on_the_current_second() -> None:
    clock = Clock()
    counts = Counts(10, clock)
    counts.add(1)
    clock.now -= 5
    counts.add(1)
    clock.now += 6
    assert counts.last(1)[1] == [2]


def test_level_keeps_its_value_through_quiet_seconds() -> None:
    clock = Clock()
    level = Level(300, clock)
    level.set(3)
    clock.now += 4
    level.set(5)
    level.set(4)  # within the same second: the last value counts
    clock.now += 2
    end, values = level.last(7)
    assert end == int(clock.now)
    assert values == [0, 3, 3, 3, 3, 4, 4]


def test_reading_more_than_the_span_is_a_wiring_mistake() -> None:
    with pytest.raises(ValueError, match="1 to 10"):
        Counts(10, Clock()).last(11)
