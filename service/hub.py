"""The hub: rooms, subscriptions, stored publishing and local fan-out.

One broker subscription per room per process, taken when the first local
member joins and dropped when the last one leaves. A stored envelope is
encoded once (by the history store, once its offset is known), published
once, and the same text is pushed into the bounded outbox of every local
member; nothing in the fan-out awaits a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from . import metrics
from .connection import Connection
from .envelopes import (
    Chat,
    Close,
    Envelope,
    Error,
    ErrorCode,
    Joined,
    Left,
    Level,
    Notification,
    Presence,
    Since,
    System,
    User,
    encode,
    now,
    position_decoder,
)
from .history import Appended, HistoryStore, Page, recovered
from .presence import PresenceStore
from .settings import Settings
from .transport import CONTROL_CHANNEL, ROOM_PREFIX, Transport, room_channel

log = logging.getLogger("roomcast.hub")

# Stored frames a room keeps after fanning them out, so a join whose history
# read raced with new messages picks up what arrived meanwhile.
RECENT_FRAMES: Final = 128
# How long a frame that arrived ahead of its predecessor waits for it before
# the hub reads the missing ones from history (workers publish concurrently).
GAP_GRACE: Final = 0.05
JOIN_READS: Final = 8
# Bytes an envelope may grow by once its real epoch (<= 32) and offset (<= 16 digits) are in.
POSITION_SLACK: Final = 48
# How long notify/disconnect wait for every worker to say how many connections it reached.
TALLY_TIMEOUT: Final = 2.0
_DISCONNECTED: Final = (
    "The application ended this user's connections: get a new token before reconnecting."
)
_SYSTEM_PREFIX: Final = '{"type":"system"'


class HubError(Exception):
    """A request the hub refuses; becomes an `error` envelope."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(detail)
        self.code: ErrorCode = code
        self.detail = detail


class _SystemView(msgspec.Struct):
    user: User


class _UserDelivery(msgspec.Struct, tag="user", tag_field="kind"):
    """On the control channel: a frame for (or a close of) one user's connections.
    With `ask`, every worker answers with a `_Tally` of the connections it reached."""

    user: str
    frame: str | None = None
    close: int | None = None
    ask: str | None = None


class _Tally(msgspec.Struct, tag="tally", tag_field="kind"):
    answer: str
    count: int


class _Count:
    """The answers to one `ask`, summed until every live worker has answered."""

    __slots__ = ("answers", "done", "expected", "total")

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.answers = 0
        self.total = 0
        self.done = asyncio.Event()


_system_decoder = msgspec.json.Decoder(_SystemView)
_control_decoder = msgspec.json.Decoder(_UserDelivery | _Tally)
_control_encoder = msgspec.json.Encoder()


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
        self.recent: deque[tuple[int, str]] = deque(maxlen=RECENT_FRAMES)
        self.held: dict[int, str] = {}  # frames that arrived ahead of a gap
        self.filling: asyncio.Task[None] | None = None

    @property
    def empty(self) -> bool:
        return not self.live and not self.joining and not self.pending

    @property
    def members(self) -> tuple[Connection, ...]:
        return (*self.live, *self.joining)


@dataclass(frozen=True, slots=True)
class Stats:
    connections: int
    rooms: int
    subscriptions: int
    tasks: int
    users: int


class Hub:
    def __init__(
        self,
        settings: Settings,
        store: HistoryStore,
        presence: PresenceStore,
        transport_url: str | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.presence = presence
        self.transport = Transport(
            transport_url or settings.broadcast_url, self._on_message, self._catch_up
        )
        self.rooms: dict[str, Room] = {}
        self.connections: set[Connection] = set()
        self.users: dict[str, set[Connection]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._counts: dict[str, _Count] = {}

    # --- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        await self.store.connect()
        await self.presence.start()
        await self.transport.connect()
        await self.transport.subscribe(CONTROL_CHANNEL)

    async def stop(self) -> None:
        # Normally the server has closed every socket (1012) before the lifespan ends.
        await asyncio.gather(*(c.drop(Close.SERVICE_RESTART, 1.0) for c in list(self.connections)))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.transport.disconnect()
        await self.presence.stop()
        await self.store.disconnect()

    @property
    def ready(self) -> bool:
        return self.transport.ready

    def stats(self) -> Stats:
        return Stats(
            connections=len(self.connections),
            rooms=len(self.rooms),
            subscriptions=len(self.transport.subscribed) - 1,  # less the control channel
            tasks=len(self._tasks) + sum(c.sending for c in self.connections),
            users=len(self.users),
        )

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- connections -----------------------------------------------------

    def attach(self, conn: Connection) -> None:
        self.connections.add(conn)
        metrics.CONNECTIONS.inc()
        self.users.setdefault(conn.user.id, set()).add(conn)

    def on_overflow(self, conn: Connection) -> None:
        log.info("slow consumer %s closed with 4408", conn.id)
        metrics.SLOW_CONSUMERS.inc()
        self.spawn(conn.drop(Close.SLOW_CONSUMER))

    async def detach(self, conn: Connection) -> None:
        """Every disconnect path ends here: leave every room, release everything.

        The local bookkeeping is released before the first await, so even a
        cancelled clean-up leaves no membership behind.
        """
        conn.stop()
        if conn in self.connections:
            metrics.CONNECTIONS.dec()
        self.connections.discard(conn)
        mine = self.users.get(conn.user.id)
        if mine is not None:
            mine.discard(conn)
            if not mine:
                del self.users[conn.user.id]
        names = list(conn.rooms)
        for name in names:
            self._unregister(conn, name)
        for name in names:
            try:
                await self._forget_presence(name, conn.user)
            except Exception as exc:  # presence corrects itself when its store is back
                log.warning("presence of %s in %s not released: %r", conn.user.id, name, exc)

    # --- rooms -----------------------------------------------------------

    async def _acquire(self, name: str) -> Room:
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name, self.transport.subscribe(room_channel(name)))
            metrics.ROOMS.inc()
        room.pending += 1
        try:
            # Shielded: a joiner that goes away must not cancel the subscription for others.
            await asyncio.shield(room.ready)
        except BaseException:
            room.pending -= 1
            if room.ready.done() and self.rooms.get(name) is room:
                del self.rooms[name]
                metrics.ROOMS.dec()
            raise
        return room

    def _release(self, room: Room) -> None:
        if room.empty and self.rooms.get(room.name) is room:
            del self.rooms[room.name]
            metrics.ROOMS.dec()
            self.transport.unsubscribe(room.channel)

    async def join(
        self,
        conn: Connection,
        name: str,
        *,
        since: Since | None = None,
        history: int | None = None,
        ref: str | None = None,
    ) -> None:
        settings = self.settings
        if name in conn.rooms:
            page = await self.store.last(name, 0)
            online, users = await self.presence.snapshot(name, settings.presence_list_max)
            conn.push(encode(Joined(name, page.epoch, page.top, False, online, users, ref)))
            return
        if len(conn.rooms) >= settings.max_rooms:
            raise HubError(
                "too_many_rooms",
                f"This connection is already in {settings.max_rooms} rooms (MAX_ROOMS): "
                "leave one first.",
            )
        try:
            room = await self._acquire(name)
        except Exception as exc:
            log.warning("subscribing to room %s failed: %r", name, exc)
            raise HubError(
                "internal", "The broadcast backend is unavailable: retry later."
            ) from exc
        try:
            try:
                first = await self.presence.add(name, conn.user)
            except Exception as exc:
                log.warning("presence in %s unavailable: %r", name, exc)
                raise HubError("internal", "Presence is unavailable: retry.") from exc
            try:
                online, users = await self.presence.snapshot(name, settings.presence_list_max)
                page, ok = await self._read_for_join(room, since, history)
                if conn.closing:
                    raise HubError("internal", "The connection closed during the join.")
            except BaseException as exc:
                # Nothing was joined: give back the presence counted above.
                with contextlib.suppress(Exception):
                    await self._forget_presence(name, conn.user)
                if isinstance(exc, Exception) and not isinstance(exc, HubError):
                    log.warning("join of %s failed: %r", name, exc)
                    raise HubError("internal", "History is unavailable: retry.") from exc
                raise
            # From here to the end of the block nothing awaits: the joined frame
            # and the catch-up land in the outbox before any later fan-out.
            cursor = page.top
            conn.push_replay(page.entries)
            conn.push(encode(Joined(name, page.epoch, page.top, ok, online, users, ref)))
            for offset, frame in room.recent:
                if offset > cursor:
                    conn.push(frame)
                    cursor = offset
            # _read_for_join guarantees cursor >= room.newest.
            if not room.live and not room.joining:
                room.newest = cursor  # nobody else depends on the room's position
            if cursor > room.newest:
                room.joining[conn] = cursor
            else:
                room.live.add(conn)
            conn.rooms.add(name)
            metrics.JOINS.inc()
        finally:
            room.pending -= 1
            self._release(room)
        if first and online <= settings.presence_events_max:
            await self._publish_system(name, "join", conn.user, online)

    async def _read_for_join(
        self, room: Room, since: Since | None, history: int | None
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
                page = await store.last(room.name, min(history or 0, self.settings.history_size))
                ok = False
            if page.epoch != room.epoch:
                self._new_epoch(room, page.epoch, page.top)
            oldest_recent = room.recent[0][0] if room.recent else room.newest + 1
            if room.newest <= page.top or oldest_recent <= page.top + 1:
                return page, ok
        raise HubError("internal", "The room's history changed under the join: retry.")

    async def leave(self, conn: Connection, name: str, ref: str | None = None) -> None:
        if name in conn.rooms:
            self._unregister(conn, name)
            await self._forget_presence(name, conn.user)
        conn.push(encode(Left(name, ref)))

    def _unregister(self, conn: Connection, name: str) -> None:
        conn.rooms.discard(name)
        room = self.rooms.get(name)
        if room is not None:
            room.live.discard(conn)
            room.joining.pop(conn, None)
            self._release(room)

    async def _forget_presence(self, name: str, user: User) -> None:
        if await self.presence.remove(name, user):
            online, _ = await self.presence.snapshot(name, 0)
            if online < self.settings.presence_events_max:
                await self._publish_system(name, "leave", user, online)

    async def _publish_system(self, room: str, event: str, user: User, online: int) -> None:
        frame = encode(System(room, event, user, online, now()))  # type: ignore[arg-type]
        try:
            await self.transport.publish(room_channel(room), frame)
        except Exception as exc:  # ephemeral: a lost presence event is not a lost message
            log.warning("system %s event for %s not published: %r", event, room, exc)

    async def snapshot(self, name: str, ref: str | None = None) -> Presence:
        online, users = await self.presence.snapshot(name, self.settings.presence_list_max)
        return Presence(name, online, users, ref)

    # --- publishing ------------------------------------------------------

    async def _store_and_publish(
        self, room: str, build: Callable[[str, int], Envelope], dedupe: str | None
    ) -> Appended:
        limit = self.transport.max_payload

        def encoded(epoch: str, offset: int) -> str:
            text = encode(build(epoch, offset))
            # Refused before it is stored: the broker could not carry it (Postgres
            # NOTIFY). Every store builds before taking the offset, so none is lost.
            # The slack covers any epoch and offset (the Redis store builds with
            # short placeholders for them).
            size = len(text.encode()) + POSITION_SLACK
            if limit is not None and size > limit:
                raise HubError(
                    "text_too_long",
                    f"This message would be an envelope of up to {size} bytes; "
                    f"BROADCAST_URL's broker carries at most {limit} bytes.",
                )
            return text

        appended = await self.store.append(room, encoded, dedupe)
        if not appended.duplicate:
            await self.transport.publish(room_channel(room), appended.data)
            metrics.PUBLISHED.inc()
        return appended

    async def chat(self, user: User, room: str, text: str, ref: str | None = None) -> Appended:
        """Store and deliver a chat; a repeated `ref` of the same user returns the first."""
        return await self._store_and_publish(
            room,
            lambda epoch, offset: Chat(room, epoch, offset, user, text, now()),
            None if ref is None else f"{user.id}\x00{ref}",
        )

    async def publish(
        self,
        room: str,
        *,
        title: str,
        body: str,
        level: Level = "info",
        data: Any = None,
        ref: str | None = None,
    ) -> Appended:
        """Store a notification in `room` and deliver it to every member, on every worker."""
        return await self._store_and_publish(
            room,
            lambda epoch, offset: Notification(
                room=room,
                epoch=epoch,
                offset=offset,
                title=title,
                body=body,
                level=level,
                data=data,
                ts=now(),
            ),
            None if ref is None else f"\x00api\x00{ref}",
        )

    async def broadcast(self, room: str, envelope: Envelope) -> None:
        """Deliver an ephemeral envelope (not stored, no offset) to the room's members."""
        await self.transport.publish(room_channel(room), encode(envelope))

    async def notify_user(
        self,
        user_id: str,
        *,
        title: str,
        body: str,
        level: Level = "info",
        data: Any = None,
    ) -> int:
        """Send a notification to every connection of one user, on every worker;
        how many connections it reached."""
        frame = encode(
            Notification(
                room=None,
                epoch=None,
                offset=None,
                title=title,
                body=body,
                level=level,
                data=data,
                ts=now(),
            )
        )
        return await self._ask(_UserDelivery(user_id, frame=frame))

    async def disconnect_user(self, user_id: str, code: int = Close.UNAUTHORIZED) -> int:
        """Close every connection of one user, on every worker; how many there were.
        Each gets an `error` saying why first (a browser sees no close reason)."""
        frame = encode(Error("unauthorized", _DISCONNECTED)) if code == Close.UNAUTHORIZED else None
        return await self._ask(_UserDelivery(user_id, frame=frame, close=code))

    async def _ask(self, delivery: _UserDelivery) -> int:
        """Publish `delivery` and sum the workers' answers. A worker that does not
        answer within TALLY_TIMEOUT (it is dying) is left out of the sum."""
        delivery.ask = secrets.token_hex(8)
        count = self._counts[delivery.ask] = _Count(await self.presence.workers())
        try:
            await self._control(delivery)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TALLY_TIMEOUT):
                    await count.done.wait()
            return count.total
        finally:
            del self._counts[delivery.ask]

    async def _control(self, message: _UserDelivery | _Tally) -> None:
        await self.transport.publish(CONTROL_CHANNEL, _control_encoder.encode(message).decode())

    # --- fan-out (synchronous: called by the transport's listener) -------

    def _on_message(self, channel: str, text: str) -> None:
        if channel.startswith(ROOM_PREFIX):
            room = self.rooms.get(channel[len(ROOM_PREFIX) :])
            if room is not None:
                started = time.perf_counter()
                self._fan_out(room, text)
                metrics.FANOUT_SECONDS.observe(time.perf_counter() - started)
        elif channel == CONTROL_CHANNEL:
            message = _control_decoder.decode(text)
            if isinstance(message, _Tally):
                self._counted(message)
            else:
                self._deliver_to_user(message)

    def _fan_out(self, room: Room, text: str) -> None:
        position = position_decoder.decode(text)
        offset = position.offset
        if offset is None:
            skip = _system_decoder.decode(text).user.id if text.startswith(_SYSTEM_PREFIX) else None
            pushed = 0
            for conn in room.members:
                if conn.user.id != skip:
                    conn.push(text)
                    pushed += 1
            metrics.DELIVERIES.inc(pushed)
            return
        if position.epoch != room.epoch:
            self._new_epoch(room, position.epoch, offset - 1)
        if offset <= room.newest:
            return  # already delivered (a duplicate from the broker, or a replayed gap)
        if offset > room.newest + 1 and (room.live or room.joining):
            # A predecessor is still on its way (another worker published it) or lost.
            room.held[offset] = text
            if room.filling is None:
                room.filling = asyncio.create_task(self._fill_gap(room))
            return
        self._deliver(room, offset, text)
        held = room.held
        while held:
            frame = held.pop(room.newest + 1, None)
            if frame is None:
                break
            self._deliver(room, room.newest + 1, frame)

    def _deliver(self, room: Room, offset: int, text: str) -> None:
        room.newest = offset
        room.recent.append((offset, text))
        joining = room.joining
        if joining:
            for conn, cursor in list(joining.items()):
                if offset > cursor:
                    del joining[conn]
                    room.live.add(conn)
        metrics.DELIVERIES.inc(len(room.live))
        for conn in room.live:
            conn.push(text)

    async def _fill_gap(self, room: Room) -> None:
        try:
            await asyncio.sleep(GAP_GRACE)  # usually the missing frame arrives meanwhile
            while room.held and self.rooms.get(room.name) is room:
                progressed = await self._replay_missed(room)
                for offset in [o for o in room.held if o <= room.newest]:
                    del room.held[offset]
                if not progressed:
                    break  # nothing newer stored: the held frames wait for the next gap
        except Exception as exc:
            log.warning("filling a gap in room %s failed: %r", room.name, exc)
            self._new_epoch(room, room.epoch, room.newest)
        finally:
            room.filling = None

    def _new_epoch(self, room: Room, epoch: str | None, newest: int) -> None:
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

    async def _catch_up(self) -> None:
        """After the broker was lost: deliver from history what it did not."""
        for room in list(self.rooms.values()):
            await self._replay_missed(room)

    async def _replay_missed(self, room: Room) -> bool:
        """Deliver from history what the room's members have not had yet; False
        when there was nothing, or that history is gone (they then reconnect)."""
        page = await self.store.since(room.name, room.newest)
        if page.epoch != room.epoch or not page.complete:
            self._new_epoch(room, page.epoch, page.top)
            return False
        for frame in page.entries:
            self._fan_out(room, frame)
        return bool(page.entries)

    def _deliver_to_user(self, delivery: _UserDelivery) -> None:
        reached = 0
        for conn in list(self.users.get(delivery.user, ())):
            pushed = delivery.frame is None or conn.push(delivery.frame)
            if delivery.close is not None:
                conn.close_after_queued(delivery.close)
            if pushed or delivery.close is not None:
                reached += 1
        if delivery.frame is not None and delivery.close is None:
            metrics.DELIVERIES.inc(reached)
        if delivery.ask is not None:
            self.spawn(self._answer(_Tally(delivery.ask, reached)))

    async def _answer(self, tally: _Tally) -> None:
        try:
            await self._control(tally)
        except Exception as exc:  # the asking worker times out and leaves this one out
            log.warning("tally for %s not published: %r", tally.answer, exc)

    def _counted(self, tally: _Tally) -> None:
        count = self._counts.get(tally.answer)
        if count is not None:
            count.total += tally.count
            count.answers += 1
            if count.answers >= count.expected:
                count.done.set()
