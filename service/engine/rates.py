"""What one worker did, second by second: rings of per-second figures, no I/O.

`Counts` keeps events per second (frames received, deliveries), `Level` a
value such as the open connections at each second. Both advance lazily with
the clock when they are touched or read: no task, no timer. Seconds are wall
clock seconds, so that workers on several hosts line their series up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from ..observe import metrics

Clock = Callable[[], float]

RATE_SECONDS: Final = 10  # rates are taken over the last 10 whole seconds
SERIES_SECONDS: Final = 300  # the admin page's chart: the last 5 minutes


class _Ring:
    __slots__ = ("_clock", "_next", "_now", "_slot", "_slots")

    def __init__(self, span: int, clock: Clock = time.time) -> None:
        self._clock = clock
        self._slots = [0] * (span + 1)  # the current second too
        self._now = int(clock())
        self._next = float(self._now + 1)  # when the ring moves on (a float: a fast compare)
        self._slot = self._now % len(self._slots)

    def _advance(self) -> int:
        """Move to the clock's second; returns its slot. A clock that stepped back
        leaves the ring on its current second."""
        second = int(self._clock())
        if second > self._now:
            size = len(self._slots)
            fill = self._fill()
            for s in range(self._now + 1, min(second, self._now + size) + 1):
                self._slots[s % size] = fill
            self._now = second
            self._next = float(second + 1)
            self._slot = second % size
        return self._slot

    def _fill(self) -> int:
        return 0

    def last(self, seconds: int) -> tuple[int, list[int]]:
        """The second now, and the figures of the `seconds` whole seconds before it,
        oldest first."""
        if not 0 < seconds < len(self._slots):
            raise ValueError(f"seconds must be 1 to {len(self._slots) - 1}")
        self._advance()
        size = len(self._slots)
        return self._now, [self._slots[s % size] for s in range(self._now - seconds, self._now)]


class Counts(_Ring):
    """Events per second over the last `span` whole seconds."""

    __slots__ = ()

    def add(self, n: int = 1) -> None:
        # Called for every frame received and every fan-out: the common case is one
        # clock read and one compare.
        if self._clock() >= self._next:
            self._advance()
        self._slots[self._slot] += n

    def per_second(self, seconds: int = RATE_SECONDS) -> float:
        return sum(self.last(seconds)[1]) / seconds


class Deliveries(Counts):
    """Frames handed to connections per second, each also counted in
    `roomcast_deliveries_total`: one call, so the two figures cannot part."""

    __slots__ = ()

    def add(self, n: int = 1) -> None:
        metrics.DELIVERIES.inc(n)
        Counts.add(self, n)


class Level(_Ring):
    """A value at the end of each of the last `span` seconds."""

    __slots__ = ("value",)

    def __init__(self, span: int, clock: Clock = time.time) -> None:
        super().__init__(span, clock)
        self.value = 0

    def _fill(self) -> int:
        return self.value  # seconds without a change kept the value

    def set(self, value: int) -> None:
        slot = self._advance()  # fills the seconds since the last change with the old value
        self._slots[slot] = self.value = value


class Connections(Level):
    """Open connections at the end of each second; every change also moves
    `roomcast_connections`, by the difference, since every hub of a process shares
    that gauge."""

    __slots__ = ()

    def set(self, value: int) -> None:
        metrics.CONNECTIONS.inc(value - self.value)
        Level.set(self, value)


class Activity:
    """One worker's figures for the cluster's stats."""

    __slots__ = ("connections", "deliveries", "messages_in", "slow_consumers")

    def __init__(self, clock: Clock = time.time) -> None:
        self.messages_in = Counts(RATE_SECONDS, clock)
        self.deliveries = Deliveries(SERIES_SECONDS, clock)
        self.connections = Connections(SERIES_SECONDS, clock)
        self.slow_consumers = 0
