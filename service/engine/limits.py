"""Limits as plain values, per connection and per client address: no I/O, the caller
passes the clock."""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Final

BAD_FRAMES_BEFORE_CLOSE: Final = 50
RATE_STRIKES_BEFORE_CLOSE: Final = 10
RATE_STRIKE_WINDOW: Final = 60.0


class Verdict:
    OK: Final = 0
    LIMITED: Final = 1  # answer `rate_limited`, keep the connection
    CLOSE: Final = 2  # the 10th strike within a minute: close with 4429


@dataclass(slots=True)
class RateLimiter:
    """A token bucket of `rate` frames per second with a burst of twice that,
    plus the count of recent refusals that turns into a close."""

    rate: float
    burst: float = 0.0
    tokens: float = -1.0
    stamp: float = 0.0
    strikes: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if not self.burst:
            self.burst = 2 * self.rate
        if self.tokens < 0:
            self.tokens = self.burst

    def check(self, now: float) -> int:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return Verdict.OK
        strikes = self.strikes
        while strikes and now - strikes[0] > RATE_STRIKE_WINDOW:
            strikes.popleft()
        strikes.append(now)
        return Verdict.CLOSE if len(strikes) >= RATE_STRIKES_BEFORE_CLOSE else Verdict.LIMITED


@dataclass(slots=True)
class BadFrames:
    """Consecutive bad frames; a good frame resets the count."""

    count: int = 0

    def bad(self) -> bool:
        """Count one; True when the connection must now be closed with 1008."""
        self.count += 1
        return self.count >= BAD_FRAMES_BEFORE_CLOSE

    def good(self) -> None:
        self.count = 0


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class ConnectRate:
    """CONNECT_RATE: a token bucket per client address, `rate` connections per second
    with a burst of twice that (`rate` 0: no limit).

    Memory stays bounded: a bucket that has refilled completely is the same as no
    bucket, so it is forgotten; buckets are kept in the order of their last use,
    and at most `max_addresses` of them (past that the least recently used one is
    forgotten early, which only ever errs towards letting a connection in).
    """

    __slots__ = ("_buckets", "burst", "max_addresses", "rate")

    def __init__(self, rate: float, max_addresses: int = 16384) -> None:
        self.rate = rate
        self.burst = 2.0 * rate
        self.max_addresses = max_addresses
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, address: str, now: float) -> bool:
        """Take one connection from `address`'s bucket; False when it is empty."""
        if self.rate <= 0:
            return True
        self._forget_full(now)
        buckets = self._buckets
        bucket = buckets.pop(address, None)
        if bucket is None:
            bucket = _Bucket(self.burst, now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        buckets[address] = bucket  # the most recently used, last
        while len(buckets) > self.max_addresses:
            buckets.popitem(last=False)
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _forget_full(self, now: float) -> None:
        """Drop the least recently used buckets that have refilled by now."""
        refill = self.burst / self.rate
        buckets = self._buckets
        while buckets:
            oldest = next(iter(buckets.values()))
            if now - oldest.stamp < refill:
                break
            buckets.popitem(last=False)
