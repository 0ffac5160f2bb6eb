"""The hub: rooms and their subscriptions, joins and leaves.

One broker subscription per room per process, taken when the first local
member joins and dropped when the last one leaves. What is published
(`publisher`) comes back from the broker and is pushed into the bounded
outbox of every local member (`sequencer`); nothing in the fan-out awaits a
client. Requests that reach a user on every worker go through `control`, the
admin's figures of every worker through `cluster`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from ..backends.broker.base import Broker
from ..backends.history.base import HistoryStore
from ..backends.presence.base import PresenceStore
from ..errors import ProtocolError
from ..observe import metrics
from ..protocol.codec import encode
from ..protocol.codes import Close
from ..protocol.envelopes import (
    Joined,
    Left,
    Presence,
    Since,
    System,
    User,
    now,
)
from ..settings import Settings
from .cluster import Cluster
from .connection import Connection
from .control import Control
from .publisher import Publisher
from .rates import Activity
from .sequencer import Room, Sequencer
from .transport import CONTROL_CHANNEL, ROOM_PREFIX, Transport, room_channel

log = logging.getLogger("roomcast.hub")


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
        broker: Broker,
    ) -> None:
        self.settings = settings
        self.store = store
        self.presence = presence
        self.rooms: dict[str, Room] = {}
        self.connections: set[Connection] = set()
        self.users: dict[str, set[Connection]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.activity = activity = Activity()
        self.sequencer = Sequencer(store, self.rooms, self.spawn, activity.deliveries)
        self.transport = Transport(broker, self._on_message, self.sequencer.catch_up)
        self.control = Control(
            self.transport, presence, self.users, self.spawn, activity.deliveries
        )
        self.cluster = Cluster(
            self.control, self.transport, store, presence, activity, self.rooms, self.users
        )
        self.publisher = Publisher(store, self.transport, self.control)

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
        """Run `coro` in a task that `stop()` cancels."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        metrics.TASKS.inc()
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        metrics.TASKS.dec()

    # --- connections -----------------------------------------------------

    def attach(self, conn: Connection) -> None:
        self.connections.add(conn)
        mine = self.users.get(conn.user.id)
        if mine is None:
            mine = self.users[conn.user.id] = set()
            metrics.USERS.inc()
        mine.add(conn)
        self.activity.connections.set(len(self.connections))

    def on_overflow(self, conn: Connection) -> None:
        log.info("slow consumer %s closed with 4408", conn.id)
        metrics.SLOW_CONSUMERS.inc()
        self.activity.slow_consumers += 1
        self.spawn(conn.drop(Close.SLOW_CONSUMER))

    async def detach(self, conn: Connection) -> None:
        """Every disconnect path ends here: leave every room, release everything.

        The local bookkeeping is released before the first await, so even a
        cancelled clean-up leaves no membership behind.
        """
        conn.stop()
        self.connections.discard(conn)
        self.activity.connections.set(len(self.connections))
        mine = self.users.get(conn.user.id)
        if mine is not None:
            mine.discard(conn)
            if not mine:
                del self.users[conn.user.id]
                metrics.USERS.dec()
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
            room.join_ended()
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
            conn.send(encode(Joined(name, page.epoch, page.top, False, online, users, ref)))
            return
        self.check_room_limit(conn)
        try:
            room = await self._acquire(name)
        except Exception as exc:
            log.warning("subscribing to room %s failed: %r", name, exc)
            raise ProtocolError(
                "internal", "The broadcast backend is unavailable: retry later."
            ) from exc
        try:
            try:
                first = await self.presence.add(name, conn.user)
            except Exception as exc:
                log.warning("presence in %s unavailable: %r", name, exc)
                raise ProtocolError("internal", "Presence is unavailable: retry.") from exc
            try:
                online, users = await self.presence.snapshot(name, settings.presence_list_max)
                count = min(history or 0, settings.history_size)
                page, ok = await self.sequencer.read_for_join(room, since, count)
                if conn.closing:
                    raise ProtocolError("internal", "The connection closed during the join.")
            except BaseException as exc:
                # Nothing was joined: give back the presence counted above.
                with contextlib.suppress(Exception):
                    await self._forget_presence(name, conn.user)
                if isinstance(exc, Exception) and not isinstance(exc, ProtocolError):
                    log.warning("join of %s failed: %r", name, exc)
                    raise ProtocolError("internal", "History is unavailable: retry.") from exc
                raise
            joined = encode(Joined(name, page.epoch, page.top, ok, online, users, ref))
            self.sequencer.admit(room, conn, page, joined)
            conn.rooms.add(name)
            metrics.JOINS.inc()
        finally:
            room.join_ended()
            self._release(room)
        if first and online <= settings.presence_events_max:
            await self._publish_system(name, "join", conn.user, online)

    def check_room_limit(self, conn: Connection) -> None:
        """ProtocolError `too_many_rooms` when `conn` may join no other room (MAX_ROOMS)."""
        if len(conn.rooms) >= self.settings.max_rooms:
            raise ProtocolError(
                "too_many_rooms",
                f"This connection is already in {self.settings.max_rooms} rooms (MAX_ROOMS): "
                "leave one first.",
            )

    async def leave(self, conn: Connection, name: str, ref: str | None = None) -> None:
        if name in conn.rooms:
            self._unregister(conn, name)
            await self._forget_presence(name, conn.user)
        conn.send(encode(Left(name, ref)))

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

    # --- the listener ----------------------------------------------------

    def _on_message(self, channel: str, text: str) -> None:
        if channel.startswith(ROOM_PREFIX):
            room = self.rooms.get(channel[len(ROOM_PREFIX) :])
            if room is not None:
                self.sequencer.receive(room, text)
        elif channel == CONTROL_CHANNEL:
            self.control.receive(text)
