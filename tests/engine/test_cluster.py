"""The control channel's questions and the cluster's figures, in process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from roomcast.backends.broker.memory import MemoryBroker
from roomcast.engine.cluster import WorkerStats, _series
from roomcast.engine.control import Query
from roomcast.engine.hub import Hub

from .hubs import started_hub
from .test_hub import Client


class SmallBroker(MemoryBroker):
    """A broker that carries at most `max_payload` bytes (as Postgres NOTIFY does)."""

    max_payload = 400

    def __init__(self) -> None:
        super().__init__("memory://")
        self.published: list[str] = []

    async def publish(self, channel: str, message: Any) -> None:
        assert len(message.encode()) <= self.max_payload, f"{len(message.encode())} bytes"
        self.published.append(message)
        await super().publish(channel, message)


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    async with started_hub(SmallBroker()) as hub:
        yield hub


async def test_an_answer_over_the_brokers_limit_arrives_whole_in_parts(hub: Hub) -> None:
    # Quotes, control characters and non-ASCII grow when escaped in JSON.
    big = json.dumps([f'room "{i}"\x01 é ☃ \\' for i in range(120)])
    hub.control.responders["big"] = lambda params: big.encode()
    broker = hub.transport.backend
    assert isinstance(broker, SmallBroker)

    assert await hub.control.ask(Query("big")) == [big]
    parts = [json.loads(m) for m in broker.published if '"kind":"answer"' in m]
    assert len(parts) > 1
    assert sorted(p["part"] for p in parts) == list(range(len(parts)))


async def test_stats_and_rooms_of_one_worker(hub: Hub) -> None:
    ann, ann_again, bob = Client(hub, "ann"), Client(hub, "ann"), Client(hub, "bob")
    await hub.join(ann.conn, "lobby")
    await hub.join(ann_again.conn, "lobby")
    await hub.join(bob.conn, "lobby")
    await hub.join(bob.conn, "team")
    await hub.publisher.chat(bob.conn.user, "team", "hi")

    stats = await hub.cluster.stats()
    assert (stats.workers, stats.connections, stats.rooms, stats.users) == (1, 3, 2, 2)
    assert (stats.broker, stats.history) == ("connected", "connected")
    rooms = await hub.cluster.room_list("", 10)
    assert [(r.room, r.online, r.offset) for r in rooms] == [("lobby", 2, 0), ("team", 1, 1)]
    assert [r.room for r in await hub.cluster.room_list("te", 10)] == ["team"]
    assert [r.room for r in await hub.cluster.room_list("", 1)] == ["lobby"]


async def test_without_the_broker_the_figures_are_this_workers(hub: Hub) -> None:
    Client(hub, "ann")
    await hub.transport.disconnect()  # as the listener does when the broker goes away
    stats = await hub.cluster.stats()
    assert (stats.workers, stats.connections, stats.broker) == (1, 1, "reconnecting")


def test_series_of_workers_are_added_up_second_by_second() -> None:
    def worker(end: int, connections: list[int], deliveries: list[int]) -> WorkerStats:
        pad = 300 - len(connections)
        return WorkerStats(0, [], [], 0, 0, 0, end, [0] * pad + connections, [0] * pad + deliveries)

    # The second worker answered 2 seconds of its clock earlier.
    series = _series([worker(1000, [1, 2, 3], [5, 5, 5]), worker(998, [4, 4, 7], [1, 2, 3])])
    assert series.end == 1000
    assert series.connections[-5:] == [4, 4, 8, 9, 10]
    assert series.deliveries[-5:] == [1, 2, 8, 5, 5]
    assert msgspec.json.encode(series)  # what the API sends
