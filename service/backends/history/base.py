"""The history contract: offsets, epochs, retention and the recovery decision.

A store assigns each stored envelope its room's next offset and keeps the
encoded text, so every envelope is encoded exactly once, after its offset is
known. This module holds the contract and the pure recovery rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

# Builds the encoded envelope once its epoch and offset are known.
Build = Callable[[str, int], str]

# Seconds a shared store (Redis, Postgres) may take to answer one call.
CALL_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Appended:
    epoch: str
    offset: int
    data: str
    duplicate: bool  # the dedupe key was seen: nothing was stored


@dataclass(frozen=True, slots=True)
class Page:
    """Retained messages of a room, oldest first.

    `complete` is True when nothing between the requested position and the
    first entry has been trimmed away.
    """

    epoch: str
    top: int
    entries: list[str]
    complete: bool = True


class HistoryStore(Protocol):
    async def connect(self) -> None: ...

    async def disconnect(self) -> None: ...

    async def ping(self) -> None:
        """A cheap round trip to the store; raises when it does not answer."""
        ...

    async def append(self, room: str, build: Build, dedupe: str | None = None) -> Appended:
        """Store the next envelope of `room`; with a `dedupe` key already stored
        within retention, return the first one instead."""
        ...

    async def since(self, room: str, offset: int) -> Page:
        """Every retained message with an offset above `offset`."""
        ...

    async def last(self, room: str, count: int) -> Page:
        """The last `count` retained messages."""
        ...


def recovered(epoch: str, offset: int, page: Page) -> bool:
    """Whether a client at (epoch, offset) can be brought up to date from `page`
    (a `since(offset)` read): same epoch, not ahead of the room, no gap."""
    return epoch == page.epoch and offset <= page.top and page.complete
