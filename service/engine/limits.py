"""Per-connection limits as plain values: no I/O, the caller passes the clock."""

from __future__ import annotations

from collections import deque
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
