"""The hub in-process: subscriptions, ordering and fan-out without a server."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from roomcast.backends.broker.memory import MemoryBroker as MemoryBackend
from roomcast.backends.broker.redis import RedisBroker
from roomcast.backends.history.memory import MemoryStore
from roomcast.backends.presence.local import LocalPresence
from roomcast.backends.presence.redis import RedisPresence
from roomcast.engine.connection import Connection
from roomcast.engine.hub import Hub
from roomcast.engine.wire import Wire
from roomcast.protocol.envelopes import User
from roomcast.settings import Settings

from .hubs import started_hub


class Client:
    """A connection whose socket is a list of the frames it was sent."""

    def __init__(self, hub: Hub, user_id: str, outbox: int = 64) -> None:
        self.frames: list[dict[str, Any]] = []
        self.closed: int | None = None
        self.arrived = asyncio.Condition()
        self.conn = Connection(
            user_id,
            User(user_id, user_id),
            Wire(self._send),
            limit=outbox,
            rate=100,
            on_overflow=hub.on_overflow,
        )
        hub.attach(self.conn)
        self.conn.start()

    async def _send(self, message: Any) -> None:
        async with self.arrived:
            if message["type"] == "websocket.send":
                self.frames.append(json.loads(message["text"]))
            else:
                self.closed = message["code"]
            self.arrived.notify_all()

    async def wait_for(self, kind: str, count: int = 1) -> list[dict[str, Any]]:
        async with asyncio.timeout(5), self.arrived:
            await self.arrived.wait_for(lambda: len(self.of(kind)) >= count)
        return self.of(kind)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == kind]


class GatedUnsubscribe(MemoryBackend):
    """A broker whose UNSUBSCRIBE takes as long as the test wants."""

    def __init__(self) -> None:
        super().__init__("memory://")
        self.gate = asyncio.Event()
        self.unsubscribing = asyncio.Event()

    async def unsubscribe(self, channel: str) -> None:
        self.unsubscribing.set()
        await self.gate.wait()
        await super().unsubscribe(channel)


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    async with started_hub(MemoryBackend()) as hub:
        yield hub


async def test_rejoin_during_unsubscribe_waits_and_stays_subscribed(hub: Hub) -> None:
    backend = GatedUnsubscribe()
    await backend.connect()
    hub.transport.backend = backend
    hub.transport.subscribed.clear()
    await hub.transport.disconnect()
    await hub.transport.connect()
    await hub.transport.subscribe("c.users")
    ann, bob = Client(hub, "ann"), Client(hub, "bob")

    await hub.join(ann.conn, "r")
    await hub.leave(ann.conn, "r")  # the last member: unsubscribe starts and hangs
    async with asyncio.timeout(5):
        await backend.unsubscribing.wait()
    join = asyncio.create_task(hub.join(bob.conn, "r"))
    done, _ = await asyncio.wait([join], timeout=0.2)
    assert not done, "a join was acknowledged while the room's unsubscribe was in flight"
    backend.gate.set()
    async with asyncio.timeout(5):
        await join
    assert "r.r" in backend._subscribed
    await hub.publisher.chat(ann.conn.user, "r", "still there?")
    chats = await bob.wait_for("chat")
    assert chats[0]["text"] == "still there?"


async def test_concurrent_chats_get_gapless_offsets_in_send_order(hub: Hub) -> None:
    # In-process senders never yield between chats: outboxes must hold the whole burst.
    clients = [Client(hub, f"u{i}", outbox=500) for i in range(5)]
    for c in clients:
        await hub.join(c.conn, "r")

    async def send_all(c: Client) -> None:
        for n in range(40):
            await hub.publisher.chat(c.conn.user, "r", f"{c.conn.user.id}:{n}")

    await asyncio.gather(*(send_all(c) for c in clients))
    for c in clients:
        chats = await c.wait_for("chat", 200)
        assert [f["offset"] for f in chats] == list(range(1, 201))
        for sender in clients:
            mine = [f["text"] for f in chats if f["user"]["id"] == sender.conn.user.id]
            assert mine == [f"{sender.conn.user.id}:{n}" for n in range(40)]


async def test_one_subscription_per_room_taken_and_dropped(hub: Hub) -> None:
    a, b = Client(hub, "a"), Client(hub, "b")
    await hub.join(a.conn, "r")
    await hub.join(b.conn, "r")
    assert hub.transport.subscribed == {"c.users", "r.r"}
    await hub.leave(a.conn, "r")
    assert "r.r" in hub.transport.subscribed
    await hub.leave(b.conn, "r")
    async with asyncio.timeout(5):
        await hub.transport.settled()
    assert hub.transport.subscribed == {"c.users"}
    assert hub.stats().rooms == 0


class FlakyBroker(MemoryBackend):
    """A broker connection that can be cut: while down, publishes are lost and
    the listener's read fails, as with a Redis server that went away."""

    def __init__(self) -> None:
        super().__init__("memory://")
        self.down = False
        self.cut = asyncio.Event()
        self.connects = 0

    async def connect(self) -> None:
        if self.down:
            raise ConnectionError("broker down")
        self.connects += 1
        await super().connect()

    async def publish(self, channel: str, message: Any) -> None:
        if not self.down:
            await super().publish(channel, message)

    async def next_published(self) -> Any:
        get = asyncio.create_task(super().next_published())
        cut = asyncio.create_task(self.cut.wait())
        await asyncio.wait([get, cut], return_when=asyncio.FIRST_COMPLETED)
        if cut.done():
            get.cancel()
            self.cut.clear()
            raise ConnectionError("connection reset by broker")
        cut.cancel()
        return get.result()


async def test_listener_survives_a_broker_outage_and_delivers_the_gap_from_history() -> None:
    settings = Settings()
    broker = FlakyBroker()
    hub = Hub(
        settings, MemoryStore(settings.history_size, settings.history_ttl), LocalPresence(), broker
    )
    await hub.start()
    try:
        ann = Client(hub, "ann")
        await hub.join(ann.conn, "r")
        await hub.publisher.chat(ann.conn.user, "r", "before")
        await ann.wait_for("chat", 1)
        broker.down = True
        broker.cut.set()
        async with asyncio.timeout(5):
            while hub.ready:
                await asyncio.sleep(0.01)
        for n in range(3):  # acknowledged and stored, but the broker loses them
            await hub.publisher.chat(ann.conn.user, "r", f"during {n}")
        broker.down = False
        chats = await ann.wait_for("chat", 4)
        assert [(c["offset"], c["text"]) for c in chats] == [
            (1, "before"),
            (2, "during 0"),
            (3, "during 1"),
            (4, "during 2"),
        ]
        assert hub.ready and hub.transport.reconnects == 1 and broker.connects == 2
        await hub.publisher.chat(ann.conn.user, "r", "after")
        chats = await ann.wait_for("chat", 5)
        assert [c["offset"] for c in chats] == [1, 2, 3, 4, 5]
    finally:
        await hub.stop()


async def test_frames_published_out_of_order_or_lost_are_delivered_in_order(hub: Hub) -> None:
    ann = Client(hub, "ann")
    await hub.join(ann.conn, "r")
    store = hub.store

    def build(text: str) -> Any:
        return lambda epoch, offset: json.dumps(
            {"type": "chat", "room": "r", "epoch": epoch, "offset": offset, "text": text}
        )

    frames = [(await store.append("r", build(f"m{n}"))).data for n in range(1, 6)]
    # Two workers published 1-3 in the order 3, 1, 2; 4 never reached the broker.
    for frame in (frames[2], frames[0], frames[1], frames[4]):
        await hub.transport.publish("r.r", frame)
    chats = await ann.wait_for("chat", 5)
    assert [c["offset"] for c in chats] == [1, 2, 3, 4, 5]
    assert [c["text"] for c in chats] == ["m1", "m2", "m3", "m4", "m5"]
    await hub.transport.publish("r.r", frames[3])  # the late copy of 4 is not delivered twice
    await hub.publisher.chat(ann.conn.user, "r", "m6")
    chats = await ann.wait_for("chat", 6)
    assert [c["offset"] for c in chats] == [1, 2, 3, 4, 5, 6]


async def test_history_lost_under_a_live_room_closes_its_members_with_1012(hub: Hub) -> None:
    ann = Client(hub, "ann")
    await hub.join(ann.conn, "r")
    await hub.publisher.chat(ann.conn.user, "r", "old epoch")
    await ann.wait_for("chat", 1)
    hub.publisher.store = MemoryStore(10, 60)  # as if the store had been flushed: a new epoch
    await hub.publisher.chat(ann.conn.user, "r", "new epoch")
    async with asyncio.timeout(5), ann.arrived:
        await ann.arrived.wait_for(lambda: ann.closed == 1012)
    assert [c["text"] for c in ann.of("chat")] == ["old epoch"]


async def test_notify_and_disconnect_a_user_on_another_worker(redis_url: str) -> None:
    url = f"{redis_url}?prefix=u{uuid.uuid4().hex[:10]}"
    settings = Settings(broadcast_url=url)
    hubs = [
        Hub(
            settings,
            MemoryStore(settings.history_size, settings.history_ttl),
            RedisPresence(url, settings.presence_ttl),
            RedisBroker(url),
        )
        for _ in range(2)
    ]
    for hub in hubs:
        await hub.start()
    try:
        bob_here, bob_there, ann = (
            Client(hubs[1], "bob"),
            Client(hubs[1], "bob"),
            Client(hubs[1], "ann"),
        )
        bob_away = Client(hubs[0], "bob")
        # Both workers answer: the count covers the connections on each.
        reached = await hubs[0].publisher.notify_user("bob", title="Mention", body="from a worker")
        assert reached == 3
        assert await hubs[1].publisher.notify_user("nobody", title="Mention", body="none") == 0
        for conn in (bob_here, bob_there, bob_away):
            (note,) = await conn.wait_for("notification")
            assert (note["title"], note["room"], note["offset"]) == ("Mention", None, None)
        assert await hubs[0].publisher.disconnect_user("bob") == 3

        def kicked(c: Client) -> Callable[[], bool]:
            return lambda: c.closed == 4401

        for conn in (bob_here, bob_there, bob_away):
            async with asyncio.timeout(5), conn.arrived:
                await conn.arrived.wait_for(kicked(conn))
        assert ann.closed is None and not ann.of("notification")
    finally:
        for hub in hubs:
            await hub.stop()


class StalledHistory(MemoryStore):
    """A store whose reads of what was missed never answer (a history server gone quiet)."""

    def __init__(self) -> None:
        super().__init__(100, 60)
        self.reading = asyncio.Event()

    async def since(self, room: str, offset: int) -> Any:
        if offset > 0:
            self.reading.set()
            await asyncio.Event().wait()
        return await super().since(room, offset)


async def test_stop_cancels_a_gap_fill_that_waits_on_history() -> None:
    store = StalledHistory()
    hub = Hub(Settings(), store, LocalPresence(), MemoryBackend())
    await hub.start()
    ann = Client(hub, "ann")
    await hub.join(ann.conn, "r")
    await hub.publisher.chat(ann.conn.user, "r", "m1")
    await ann.wait_for("chat", 1)

    # Offset 3 arrives without 2 (lost): the hub waits for it, then reads history, which stalls.
    def chat(epoch: str, offset: int) -> str:
        return json.dumps({"type": "chat", "room": "r", "epoch": epoch, "offset": offset})

    await store.append("r", chat)
    third = await store.append("r", chat)
    assert third.offset == 3
    await hub.transport.publish("r.r", third.data)
    async with asyncio.timeout(5):
        await store.reading.wait()
    fills = [t for t in asyncio.all_tasks() if "_fill_gap" in repr(t.get_coro())]
    assert fills, "no gap fill started"
    async with asyncio.timeout(5):
        await hub.stop()
    assert all(t.done() for t in fills), "a gap fill outlived the hub"
