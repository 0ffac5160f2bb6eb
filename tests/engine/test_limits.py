"""CONNECT_RATE's buckets as plain values: the clock is passed in."""

from __future__ import annotations

from roomcast.engine.limits import ConnectRate


def test_a_burst_of_twice_the_rate_then_the_rate() -> None:
    rate = ConnectRate(20)
    assert all(rate.allow("10.0.0.1", 100.0) for _ in range(40))
    assert not rate.allow("10.0.0.1", 100.0)
    assert rate.allow("10.0.0.2", 100.0)  # another address has its own bucket
    assert rate.allow("10.0.0.1", 100.06)  # a twentieth of a second later: one more
    assert not rate.allow("10.0.0.1", 100.06)
    assert sum(rate.allow("10.0.0.1", 200.0) for _ in range(50)) == 40  # refilled: a burst
    allowed = sum(rate.allow("10.0.0.1", 200.0 + i / 100) for i in range(1, 101))
    assert 19 <= allowed <= 20  # then over a second, the rate


def test_zero_turns_it_off() -> None:
    rate = ConnectRate(0)
    assert all(rate.allow("10.0.0.1", 0.0) for _ in range(10_000))
    assert len(rate) == 0


def test_idle_buckets_are_forgotten() -> None:
    """A bucket that has refilled is the same as none: memory stays bounded by the
    addresses seen within the refill time (burst / rate = 2 s)."""
    rate = ConnectRate(20)
    for i in range(1000):
        rate.allow(f"10.0.{i // 256}.{i % 256}", 100.0 + i / 1000)
    assert len(rate) == 1000
    rate.allow("10.9.9.9", 102.5)  # more than two seconds after most of them
    assert len(rate) < 600
    rate.allow("10.9.9.9", 110.0)
    assert len(rate) == 1


def test_the_number_of_addresses_is_capped() -> None:
    rate = ConnectRate(20, max_addresses=100)
    for i in range(1000):
        assert rate.allow(f"10.0.{i // 256}.{i % 256}", 100.0)
    assert len(rate) == 100
    # The least recently used were forgotten: that only ever lets a connection in.
    assert rate.allow("10.0.0.0", 100.0)
