"""History: offsets, epochs, retention and the recovery decision.

A store assigns each stored envelope its room's next offset and keeps the
encoded text, so every envelope is encoded exactly once, after its offset is
known. Stores are chosen by `HISTORY_URL`'s scheme; this module holds the
contract, the pure recovery rule and the in-process store.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlparse

from .settings import Settings, SettingsError, safe_url

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


@dataclass(slots=True)
class _Entry:
    offset: int
    stamp: float
    data: str
    dedupe: str | None


@dataclass(slots=True)
class _Room:
    top: int = 0
    entries: deque[_Entry] = field(default_factory=deque)
    refs: dict[str, _Entry] = field(default_factory=dict)


class MemoryStore:
    """History in this process: lost on restart, which a new epoch announces."""

    def __init__(self, size: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.ttl = ttl
        self.clock = clock
        self.epoch = secrets.token_hex(6)
        self._rooms: dict[str, _Room] = {}

    async def connect(self) -> None:
        pass

    async def disconnect(self) -> None:
        pass

    def _room(self, name: str) -> _Room:
        room = self._rooms.get(name)
        if room is None:
            room = self._rooms[name] = _Room()
        self._trim(room)
        return room

    def _trim(self, room: _Room) -> None:
        entries = room.entries
        horizon = self.clock() - self.ttl
        while entries and (len(entries) > self.size or entries[0].stamp < horizon):
            gone = entries.popleft()
            if gone.dedupe is not None:
                room.refs.pop(gone.dedupe, None)

    async def append(self, room: str, build: Build, dedupe: str | None = None) -> Appended:
        # No await in here: in one process, offsets come out in call order.
        state = self._room(room)
        if dedupe is not None and (seen := state.refs.get(dedupe)) is not None:
            return Appended(self.epoch, seen.offset, seen.data, duplicate=True)
        data = build(self.epoch, state.top + 1)  # first: a build that fails takes no offset
        state.top += 1
        entry = _Entry(state.top, self.clock(), data, dedupe)
        state.entries.append(entry)
        if dedupe is not None:
            state.refs[dedupe] = entry
        self._trim(state)
        return Appended(self.epoch, entry.offset, entry.data, duplicate=False)

    async def since(self, room: str, offset: int) -> Page:
        state = self._rooms.get(room)
        if state is None:
            return Page(self.epoch, 0, [], complete=offset == 0)
        self._trim(state)
        entries = [e.data for e in state.entries if e.offset > offset]
        first = state.entries[0].offset if state.entries else state.top + 1
        return Page(self.epoch, state.top, entries, complete=first <= offset + 1)

    async def last(self, room: str, count: int) -> Page:
        state = self._rooms.get(room)
        if state is None:
            return Page(self.epoch, 0, [])
        self._trim(state)
        tail = list(state.entries)[-count:] if count else []
        return Page(self.epoch, state.top, [e.data for e in tail])


def open_store(settings: Settings) -> HistoryStore:
    """The store `HISTORY_URL` names; drivers are imported here, only when used.

    Nothing connects yet: `connect()` does, in the lifespan.
    """
    url = settings.history_url
    size, ttl = settings.history_size, float(settings.history_ttl)
    scheme = urlparse(url).scheme
    if scheme == "memory":
        return MemoryStore(size, ttl)
    if scheme == "sqlite":
        from .history_sqlite import SqliteStore

        return SqliteStore(url, size, ttl)
    if scheme in ("redis", "rediss"):
        try:
            from .history_redis import RedisStore
        except ImportError as exc:
            raise _missing(url, "redis", "redis", exc) from None
        return RedisStore(url, size, ttl)
    if scheme in ("postgres", "postgresql"):
        try:
            from .history_postgres import PostgresStore
        except ImportError as exc:
            raise _missing(url, "asyncpg", "postgres", exc) from None
        return PostgresStore(url, size, ttl)
    raise SettingsError(
        f"HISTORY_URL={safe_url(url)!r} is invalid: the scheme must be one of "
        "memory://, sqlite:///, redis://, rediss://, postgres://, postgresql://."
    )


def _missing(url: str, driver: str, extra: str, exc: ImportError) -> SettingsError | ImportError:
    if (exc.name or "").partition(".")[0] != driver:
        return exc  # not the driver: a bug to see as it is
    return SettingsError(
        f"HISTORY_URL={safe_url(url)!r} needs a driver that is not installed ({exc}): "
        f"pip install 'roomcast[{extra}]'."
    )
