"""Per-room order: every member gets a room's stored frames once, in offset order.

Workers publish concurrently, so a frame can arrive from the broker ahead of
its predecessor, twice, or not at all (a broker outage). The sequencer holds
a frame that arrived ahead of a gap, fills gaps from history, drops what was
delivered already, and notices a new epoch (the room's history was lost):
its members are then closed with 1012 and learn from `recovered: false` to
reload. Ephemeral frames (no offset) pass straight through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Final

from ..backends.history.base import HistoryStore, Page, recovered
from ..errors import ProtocolError
from ..observe import metrics
from ..protocol.codec import frame_decoder, system_decoder
from ..protocol.codes import Close
from ..protocol.envelopes import Since
from .connection import Connection
from .frames import Frame
from .rates import Deliveries
from .transport import room_channel

log = logging.getLogger("roomcast.hub")

# Stored frames a room keeps after fanning them out while a join is in progress,
# so a join whose history read raced with new messages picks up what arrived
# meanwhile. Only then: every frame fanned out before the read began is in the
# store by then (a frame is stored before it is published), and frames kept for
# longer would hold memory the history store has let go (HISTORY_MEMORY_MB).
RECENT_FRAMES: Final = 128
# How long a frame that arrived ahead of its predecessor waits for it before
# the hub reads the missing ones from history (workers publish concurrently).
GAP_GRACE: Final = 0.05
JOIN_READS: Final = 8

Spawn = Callable[[Coroutine[Any, Any, Any]], None]


class Room:
    __slots__ = (
        "channel",
        "epoch",
        "filling",
        "held",
        "joining",
        "live",
        "name",
        "newest",
        "pending",
        "ready",
        "recent",
    )

    def __init__(self, name: str, ready: asyncio.Task[None]) -> None:
        self.name = name
        self.channel = room_channel(name)
        self.ready = ready
        self.pending = 0  # joins in progress
        self.live: set[Connection] = set()
        # Members whose history read ended at an offset the fan-out has not
        # reached yet: they get stored frames only above that offset.
        self.joining: dict[Connection, int] = {}
        # Every live member has been given every stored frame up to `newest`.
        self.newest = 0
        self.epoch: str | None = None
        self.recent: deque[tuple[int, Frame]] = deque(maxlen=RECENT_FRAMES)  # while pending
        self.held: dict[int, str] = {}  # frames that arrived ahead of a gap
        self.filling = False  # a gap fill is under way

    def join_ended(self) -> None:
        self.pending -= 1
        if not self.pending:
            self.recent.clear()  # no join left that could need them

    @property
    def empty(self) -> bool:
        return not self.live and not self.joining and not self.pending

    @property
    def members(self) -> tuple[Connection, ...]:
        return (*self.live, *self.joining)


class Sequencer:
    def __init__(
        self, store: HistoryStore, rooms: dict[str, Room], spawn: Spawn, deliveries: Deliveries
    ) -> None:
        self.store = store
        self.rooms = rooms
        self.spawn = spawn
        self.deliveries = deliveries

    # --- fan-out (synchronous: called by the transport's listener) -------

    def receive(self, room: Room, text: str) -> None:
        started = time.perf_counter()
        self._fan_out(room, text)
        metrics.FANOUT_SECONDS.observe(time.perf_counter() - started)

    def _fan_out(self, room: Room, text: str) -> None:
        view = frame_decoder.decode(text)
        offset = view.offset
        if offset is None:
            skip = system_decoder.decode(text).user.id if view.type == "system" else None
            frame = Frame(text)
            pushed = 0
            for conn in room.members:
                if conn.user.id != skip:
                    conn.push(frame)
                    pushed += 1
            self.deliveries.add(pushed)
            return
        if view.epoch != room.epoch:
            self.new_epoch(room, view.epoch, offset - 1)
        if offset <= room.newest:
            return  # already delivered (a duplicate from the broker, or a replayed gap)
        if offset > room.newest + 1 and (room.live or room.joining):
            # A predecessor is still on its way (another worker published it) or lost.
            room.held[offset] = text
            if not room.filling:
                room.filling = True
                self.spawn(self._fill_gap(room))
            return
        self._deliver(room, offset, text)
        held = room.held
        while held:
            later = held.pop(room.newest + 1, None)
            if later is None:
                break
            self._deliver(room, room.newest + 1, later)

    def _deliver(self, room: Room, offset: int, text: str) -> None:
        frame = Frame(text)  # framed once, for every member
        room.newest = offset
        if room.pending:
            room.recent.append((offset, frame))
        joining = room.joining
        if joining:
            for conn, cursor in list(joining.items()):
                if offset > cursor:
                    del joining[conn]
                    room.live.add(conn)
        self.deliveries.add(len(room.live))
        for conn in room.live:
            conn.push(frame)

    async def _fill_gap(self, room: Room) -> None:
        try:
            await asyncio.sleep(GAP_GRACE)  # usually the missing frame arrives meanwhile
            while room.held and self.rooms.get(room.name) is room:
                progressed = await self.replay_missed(room)
                for offset in [o for o in room.held if o <= room.newest]:
                    del room.held[offset]
                if not progressed:
                    break  # nothing newer stored: the held frames wait for the next gap
        except Exception as exc:
            log.warning("filling a gap in room %s failed: %r", room.name, exc)
            self.new_epoch(room, room.epoch, room.newest)
        finally:
            room.filling = False

    def new_epoch(self, room: Room, epoch: str | None, newest: int) -> None:
        """The room's history was lost (or cannot be filled in): its members
        reconnect with 1012, and learn from `recovered: false` to reload."""
        if room.epoch is not None:
            log.warning("room %s lost history (epoch %s -> %s)", room.name, room.epoch, epoch)
            for conn in room.members:
                conn.close_after_queued(Close.SERVICE_RESTART)
        room.epoch = epoch
        room.newest = newest
        room.recent.clear()
        room.held.clear()

    async def catch_up(self) -> None:
        """After the broker was lost: deliver from history what it did not."""
        for room in list(self.rooms.values()):
            await self.replay_missed(room)

    async def replay_missed(self, room: Room) -> bool:
        """Deliver from history what the room's members have not had yet; False
        when there was nothing, or that history is gone (they then reconnect)."""
        page = await self.store.since(room.name, room.newest)
        if page.epoch != room.epoch or not page.complete:
            self.new_epoch(room, page.epoch, page.top)
            return False
        for frame in page.entries:
            self._fan_out(room, frame)
        return bool(page.entries)

    # --- joins -----------------------------------------------------------

    async def read_for_join(
        self, room: Room, since: Since | None, history: int
    ) -> tuple[Page, bool]:
        """The replay for a join, and whether it recovers the client's position.

        Loops until the read reaches what this process has already fanned out
        (or the recent frames cover the difference), so the seam between the
        replay and live delivery has no hole.
        """
        store = self.store
        for _ in range(JOIN_READS):
            if since is not None:
                page = await store.since(room.name, since.offset)
                ok = recovered(since.epoch, since.offset, page)
                if not ok:
                    page = Page(page.epoch, page.top, [], page.complete)
            else:
                page = await store.last(room.name, history)
                ok = False
            if page.epoch != room.epoch:
                self.new_epoch(room, page.epoch, page.top)
            oldest_recent = room.recent[0][0] if room.recent else room.newest + 1
            if room.newest <= page.top or oldest_recent <= page.top + 1:
                return page, ok
        raise ProtocolError("internal", "The room's history changed under the join: retry.")

    def admit(self, room: Room, conn: Connection, page: Page, joined: str) -> None:
        """Queue the replay, the `joined` frame and the catch-up, and make `conn` a member.

        Nothing here awaits: they land in the outbox before any later fan-out.
        """
        cursor = page.top
        conn.push_replay(page.entries)
        conn.send(joined)
        for offset, frame in room.recent:
            if offset > cursor:
                conn.push(frame)
                cursor = offset
        # read_for_join guarantees cursor >= room.newest.
        if not room.live and not room.joining:
            room.newest = cursor  # nobody else depends on the room's position
        if cursor > room.newest:
            room.joining[conn] = cursor
        else:
            room.live.add(conn)
