"""History in this process (`memory://`): lost on restart, which a new epoch announces.

Bounded in time and in bytes. HISTORY_TTL is enforced on every read and by a
sweep that runs while the store is connected, so rooms nobody reads again
still let go of their messages; a room with nothing left, untouched for a
TTL, is forgotten. HISTORY_MEMORY_MB caps the bytes held across all rooms:
past it, the oldest messages of the least recently written rooms go first.
What was evicted is honestly gone: a `since` from before it is incomplete
(`recovered: false`), and a room forgotten altogether comes back with a new
epoch, since its offsets start again at 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import secrets
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from ...observe import metrics
from .base import Appended, Build, Page

DEFAULT_MEMORY_BYTES: Final = 64 * 2**20
# Estimated bytes beyond the stored text itself: an entry (its object, offset,
# timestamp and deque slot), a dedupe key's dict slot, and a room (its object,
# deque block, dicts and epoch). Estimates, on the high side.
ENTRY_OVERHEAD: Final = 160
DEDUPE_OVERHEAD: Final = 64
ROOM_OVERHEAD: Final = 1024
SWEEP_MAX_INTERVAL: Final = 60.0


RETURN_TO_SYSTEM: Final = 2**20


def return_freed_memory() -> None:
    """Hand the heap pages that freed messages leave behind back to the system, where
    the C library can (glibc's `malloc_trim`): the history's texts are allocated with
    malloc, and without this the process keeps the pages they were in."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (AttributeError, OSError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


@dataclass(slots=True)
class _Entry:
    offset: int
    stamp: float
    data: str
    dedupe: str | None
    size: int


@dataclass(slots=True)
class _Room:
    name: str
    epoch: str
    touched: float  # last read or write
    size: int
    top: int = 0
    entries: deque[_Entry] = field(default_factory=deque)
    refs: dict[str, _Entry] = field(default_factory=dict)


class MemoryStore:
    """History in this process: lost on restart, which a new epoch announces."""

    def __init__(
        self,
        size: int,
        ttl: float,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.size = size
        self.ttl = ttl
        self.memory_bytes = memory_bytes
        self.clock = clock
        self.held = 0  # estimated bytes of every room and entry
        self._evicted = 0  # bytes evicted since the heap was last trimmed
        # Least recently written first: the order in which memory pressure evicts.
        self._rooms: OrderedDict[str, _Room] = OrderedDict()
        self._filled: OrderedDict[str, _Room] = OrderedDict()  # those with messages
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def sweep_interval(self) -> float:
        return min(SWEEP_MAX_INTERVAL, max(0.5, self.ttl / 2))

    async def connect(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="roomcast-history")

    async def disconnect(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            self.sweep()

    def sweep(self) -> None:
        """Trim every room to its TTL; forget rooms with nothing left that nobody read
        or wrote for a TTL."""
        held = self.held
        horizon = self.clock() - self.ttl
        for room in list(self._rooms.values()):
            self._trim(room, horizon)
            if not room.entries and room.touched < horizon:
                self._forget(room)
        metrics.HISTORY_BYTES.set(self.held)
        if held - self.held >= RETURN_TO_SYSTEM:
            return_freed_memory()

    async def ping(self) -> None:
        pass

    def _room(self, name: str) -> _Room:
        now = self.clock()
        room = self._rooms.get(name)
        if room is None:
            # Kept even when only read: a client that joined the empty room holds its
            # epoch, which the first message must carry.
            room = self._rooms[name] = _Room(
                name, secrets.token_hex(6), now, ROOM_OVERHEAD + sys.getsizeof(name)
            )
            self.held += room.size
            self._evict(room)
        else:
            self._trim(room, now - self.ttl)
            room.touched = now
        return room

    def _trim(self, room: _Room, horizon: float) -> None:
        entries = room.entries
        while entries and (len(entries) > self.size or entries[0].stamp < horizon):
            self._pop_oldest(room)

    def _pop_oldest(self, room: _Room) -> None:
        gone = room.entries.popleft()
        if gone.dedupe is not None:
            room.refs.pop(gone.dedupe, None)
        room.size -= gone.size
        self.held -= gone.size
        if not room.entries:
            self._filled.pop(room.name, None)

    def _forget(self, room: _Room) -> None:
        del self._rooms[room.name]
        self._filled.pop(room.name, None)
        self.held -= room.size

    def _evict(self, keep: _Room) -> None:
        """Free memory until the store is within its budget: the oldest messages of the
        least recently written rooms first (`keep`, just written, keeps its newest);
        only then rooms left without messages, whose epoch goes with them."""
        budget = self.memory_bytes
        if self.held <= budget:
            return
        held = self.held
        filled = self._filled
        while self.held > budget and filled:
            room = next(iter(filled.values()))
            if room is keep and len(room.entries) <= 1:
                break
            self._pop_oldest(room)
        rooms = self._rooms
        while self.held > budget and rooms:
            room = next(iter(rooms.values()))
            if room is keep or room.entries:
                break  # only rooms that are more recent, or have a message, are left
            self._forget(room)
        self._evicted += held - self.held
        if self._evicted >= max(RETURN_TO_SYSTEM, budget // 2):
            self._evicted = 0
            return_freed_memory()

    async def append(self, room: str, build: Build, dedupe: str | None = None) -> Appended:
        # No await in here: in one process, offsets come out in call order.
        state = self._room(room)
        if dedupe is not None and (seen := state.refs.get(dedupe)) is not None:
            return Appended(state.epoch, seen.offset, seen.data, duplicate=True)
        data = build(state.epoch, state.top + 1)  # first: a build that fails takes no offset
        state.top += 1
        size = sys.getsizeof(data) + ENTRY_OVERHEAD
        if not data.isascii():
            # Decoding the text from a str (as the fan-out does) makes CPython keep
            # a UTF-8 copy beside it for the string's life.
            size += len(data.encode())
        if dedupe is not None:
            size += sys.getsizeof(dedupe) + DEDUPE_OVERHEAD
        entry = _Entry(state.top, state.touched, data, dedupe, size)
        state.entries.append(entry)
        if dedupe is not None:
            state.refs[dedupe] = entry
        state.size += size
        self.held += size
        self._rooms.move_to_end(room)
        self._filled[room] = state
        self._filled.move_to_end(room)
        self._trim(state, state.touched - self.ttl)
        self._evict(state)
        metrics.HISTORY_BYTES.set(self.held)
        return Appended(state.epoch, entry.offset, entry.data, duplicate=False)

    async def since(self, room: str, offset: int) -> Page:
        state = self._room(room)
        entries = [e.data for e in state.entries if e.offset > offset]
        first = state.entries[0].offset if state.entries else state.top + 1
        complete = first <= offset + 1 if state.top else offset == 0
        return Page(state.epoch, state.top, entries, complete=complete)

    async def last(self, room: str, count: int) -> Page:
        state = self._room(room)
        tail = list(state.entries)[-count:] if count else []
        return Page(state.epoch, state.top, [e.data for e in tail])
