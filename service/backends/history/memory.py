"""History in this process (`memory://`): lost on restart, which a new epoch announces."""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .base import Appended, Build, Page


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

    async def ping(self) -> None:
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
