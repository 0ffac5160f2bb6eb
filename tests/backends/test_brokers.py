"""The Postgres and Kafka broadcast backends, one contract, against real servers.

PostgreSQL (a fresh database per test) and Tansu (a broker speaking the Kafka
protocol) are started by tests/brokers.py. Each test isolates itself by its
room names; every await has a timeout.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import string
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import pytest
from broadcaster import BroadcastBackend
from hypothesis import given, settings
from hypothesis import strategies as st

from roomcast.backends.broker import kafka as backend_kafka
from roomcast.backends.broker import postgres as backend_postgres
from roomcast.backends.broker.kafka import KafkaBroker as KafkaBackend
from roomcast.backends.broker.kafka import topic_name
from roomcast.backends.broker.postgres import PostgresBroker as PostgresBackend
from roomcast.backends.broker.postgres import pg_channel
from roomcast.backends.broker.redis import RedisBroker
from roomcast.engine.transport import CONTROL_CHANNEL, Transport, room_channel

from ..brokers import fresh_database, kafka_url, start_redis, start_tansu  # noqa: F401

T = TypeVar("T")
TIMEOUT = 10.0
BACKENDS = ["postgres", "kafka"]
ROOM_CHARS = string.ascii_uppercase + string.ascii_lowercase + string.digits + "_-.:"


async def within(awaitable: Awaitable[T], timeout: float = TIMEOUT) -> T:
    return await asyncio.wait_for(awaitable, timeout)


async def receive(backend: BroadcastBackend, count: int) -> list[tuple[str, str]]:
    events = [await within(backend.next_published()) for _ in range(count)]
    return [(event.channel, event.message) for event in events]


def tagged(room: str = "") -> str:
    """A room name of this test only (Tansu is shared by the session)."""
    return f"t{secrets.token_hex(4)}{room}"


Connect = Callable[..., Awaitable[BroadcastBackend]]


@pytest.fixture(params=BACKENDS)
async def connect(request: pytest.FixtureRequest) -> AsyncIterator[Connect]:
    """Connects backends (workers) on one broker; disconnects them at the end."""
    if request.param == "postgres":
        url = await fresh_database(request.getfixturevalue("postgres_url"))
        kind: type[PostgresBackend | KafkaBackend] = PostgresBackend
    else:
        url = request.getfixturevalue("kafka_url")
        kind = KafkaBackend
    backends: list[BroadcastBackend] = []

    async def open_backend(**options: Any) -> BroadcastBackend:
        backend = kind(url, **options)
        await within(backend.connect())
        backends.append(backend)
        return backend

    yield open_backend
    for backend in backends:
        await within(backend.disconnect())


# --- the contract, on both backends ------------------------------------------------


async def test_delivers_each_channel_its_own_messages(connect: Connect) -> None:
    worker, other = await connect(), await connect()
    a, b = room_channel(tagged("a")), room_channel(tagged("b"))
    await within(worker.subscribe(a))
    await within(worker.subscribe(b))
    await within(other.publish(a, '{"to": "a"}'))
    await within(other.publish(b, "to b, ünïcödé ✓"))
    assert sorted(await receive(worker, 2)) == sorted([(a, '{"to": "a"}'), (b, "to b, ünïcödé ✓")])


async def test_keeps_the_order_of_each_channel(connect: Connect) -> None:
    worker, other = await connect(), await connect()
    a, b = room_channel(tagged("a")), room_channel(tagged("b"))
    await within(worker.subscribe(a))
    await within(worker.subscribe(b))
    for i in range(100):
        await within(other.publish(a, f"a{i}"))
        await within(other.publish(b, f"b{i}"))
    received = await receive(worker, 200)
    assert [m for c, m in received if c == a] == [f"a{i}" for i in range(100)]
    assert [m for c, m in received if c == b] == [f"b{i}" for i in range(100)]


async def test_concurrent_publishes_keep_their_call_order(connect: Connect) -> None:
    worker = await connect()
    a = room_channel(tagged())
    await within(worker.subscribe(a))
    await within(asyncio.gather(*(worker.publish(a, f"m{i}") for i in range(100))))
    assert await receive(worker, 100) == [(a, f"m{i}") for i in range(100)]


async def test_the_same_payload_twice_arrives_twice(connect: Connect) -> None:
    worker = await connect()
    a = room_channel(tagged())
    await within(worker.subscribe(a))
    await within(worker.publish(a, "same"))
    await within(worker.publish(a, "same"))
    assert await receive(worker, 2) == [(a, "same"), (a, "same")]


async def test_unsubscribe_keeps_the_other_channels(connect: Connect) -> None:
    # broadcaster's Kafka backend drops every topic here (upstream issue #65).
    worker = await connect()
    a, b = room_channel(tagged("a")), room_channel(tagged("b"))
    await within(worker.subscribe(a))
    await within(worker.subscribe(b))
    await within(worker.unsubscribe(a))
    await within(worker.publish(a, "a1: nobody listens"))
    await within(worker.publish(b, "b1"))
    # Subscribed again, `a` delivers only what comes after; had a1 been
    # delivered it would come before a2, its successor on the same channel.
    await within(worker.subscribe(a))
    await within(worker.publish(a, "a2"))
    await within(worker.publish(b, "b2"))
    received = await receive(worker, 3)
    assert sorted(received) == sorted([(a, "a2"), (b, "b1"), (b, "b2")])


async def test_changing_other_subscriptions_loses_nothing(connect: Connect) -> None:
    # Kafka: every subscribe and unsubscribe reassigns the consumer; the
    # partitions it keeps must resume where they were, not at the end.
    worker, other = await connect(), await connect()
    tag = tagged()
    busy = room_channel(tag + "busy")
    await within(worker.subscribe(busy))

    async def publish() -> None:
        for i in range(200):
            await other.publish(busy, f"m{i}")

    async def churn() -> None:
        for i in range(20):
            await worker.subscribe(room_channel(f"{tag}c{i}"))
            if i % 2:
                await worker.unsubscribe(room_channel(f"{tag}c{i - 1}"))

    # The listener reads all along, as the transport's does.
    _, _, received = await within(asyncio.gather(publish(), churn(), receive(worker, 200)), 60)
    assert received == [(busy, f"m{i}") for i in range(200)]
    # and nothing more: the next one on the channel is the next one published
    await within(other.publish(busy, "last"))
    assert await receive(worker, 1) == [(busy, "last")]


async def test_unsubscribing_everything_then_subscribing_again(connect: Connect) -> None:
    worker = await connect()
    a = room_channel(tagged())
    await within(worker.subscribe(a))
    await within(worker.unsubscribe(a))
    await within(worker.unsubscribe(a))  # twice is harmless
    await within(worker.subscribe(a))
    await within(worker.publish(a, "back"))
    assert await receive(worker, 1) == [(a, "back")]


def edge_rooms() -> list[str]:
    x63 = "x" * 63
    return [
        ROOM_CHARS[:64],  # together these two hold every allowed character,
        ROOM_CHARS[-64:],  # 64 of them, the longest room names
        ROOM_CHARS[:64].swapcase(),  # differ only in case
        "z" * 64,  # the largest packed Postgres name
        "-" * 64,
        x63 + ".",  # differ only in the last character, past Postgres' 63 bytes
        x63 + ":",
        x63 + "_",
        x63 + "-",
        "y" * 61,  # "r." + 61 = 63: the longest Postgres name kept as it is
        "y" * 62,  # 64: the shortest packed one
        "Lobby",
        "lobby",
        "a.b",  # "." and ":", and "_" (which Kafka takes for "." in collisions)
        "a:b",
        "a_b",
        "a-b",
        "a-u",  # what "_" and ":" become in a topic
        "a-c",
        ".",
        ":",
        "_",
        "-",
    ]


async def test_names_at_the_edges_do_not_collide(connect: Connect) -> None:
    worker, other = await connect(), await connect()
    channels = [room_channel(room) for room in edge_rooms()] + [CONTROL_CHANNEL]
    assert len(set(channels)) == len(channels)
    for channel in channels:
        await within(worker.subscribe(channel))
    for channel in channels:
        await within(other.publish(channel, f"for {channel}"))
    received = await receive(worker, len(channels))
    assert sorted(received) == sorted((channel, f"for {channel}") for channel in channels)


# --- PostgreSQL ----------------------------------------------------------------------


@pytest.fixture
async def pg_url(postgres_url: str) -> str:
    return await fresh_database(postgres_url)


@asynccontextmanager
async def postgres_backend(url: str, **options: Any) -> AsyncIterator[PostgresBackend]:
    backend = PostgresBackend(url, **options)
    await within(backend.connect())
    try:
        yield backend
    finally:
        await within(backend.disconnect())


async def test_postgres_payload_limit(pg_url: str) -> None:
    async with postgres_backend(pg_url) as backend:
        # NOTIFY carries 7999 bytes; "roomcast " (the default prefix) goes in front.
        assert backend.max_payload == 7999 - len("roomcast ")
        a = room_channel("limits")
        await within(backend.subscribe(a))
        largest = "x" * backend.max_payload
        await within(backend.publish(a, largest))
        assert await receive(backend, 1) == [(a, largest)]
        for too_large, size in [("x" * 7991, 7991), ("x" * 8001, 8001), ("é" * 3996, 7992)]:
            with pytest.raises(ValueError, match=f"envelope of {size} bytes exceeds Postgres "
                               "NOTIFY's 8000-byte limit.*use Redis"):  # fmt: skip
                await within(backend.publish(a, too_large))
        counted_in_bytes = "é" * 3995 + "x"  # 3996 characters, 7991 bytes: one too many
        with pytest.raises(ValueError):
            await within(backend.publish(a, counted_in_bytes))
        await within(backend.publish(a, counted_in_bytes[1:]))  # 7989 bytes
        assert await receive(backend, 1) == [(a, counted_in_bytes[1:])]


async def test_postgres_prefix_separates_deployments_in_one_database(pg_url: str) -> None:
    async with (
        postgres_backend(f"{pg_url}?prefix=blue") as blue,
        postgres_backend(f"{pg_url}?prefix=blue") as blue_too,
        postgres_backend(f"{pg_url}?prefix=green") as green,
    ):
        a = room_channel("shared-name")
        for backend in (blue, blue_too, green):
            await within(backend.subscribe(a))
        await within(green.publish(a, "for green"))
        await within(blue.publish(a, "for blue"))
        # Each sees its own deployment's message only, in one channel they share.
        assert await receive(blue_too, 1) == [(a, "for blue")]
        assert await receive(blue, 1) == [(a, "for blue")]
        assert await receive(green, 1) == [(a, "for green")]
        await within(green.publish(a, "green again"))
        assert await receive(green, 1) == [(a, "green again")]
        await within(blue.publish(a, "blue again"))
        assert await receive(blue_too, 1) == [(a, "blue again")]


async def listener_pid(url: str) -> int:
    conn = await within(asyncpg.connect(url))
    try:
        pids = await within(
            conn.fetch(
                "SELECT pid FROM pg_stat_activity "
                "WHERE application_name = 'roomcast-listener' AND datname = current_database()"
            )
        )
    finally:
        await within(conn.close())
    assert len(pids) == 1, pids
    return int(pids[0]["pid"])


async def terminate(url: str, pid: int) -> None:
    conn = await within(asyncpg.connect(url))
    try:
        assert await within(conn.fetchval("SELECT pg_terminate_backend($1)", pid))
    finally:
        await within(conn.close())


async def test_postgres_lost_listener_raises_then_reconnects(pg_url: str) -> None:
    async with postgres_backend(pg_url) as backend:
        a = room_channel("lost")
        await within(backend.subscribe(a))
        await terminate(pg_url, await listener_pid(pg_url))
        started = time.monotonic()
        with pytest.raises(ConnectionError, match="listening connection was closed"):
            await within(backend.next_published(), 5)
        assert time.monotonic() - started < 5
        with pytest.raises(ConnectionError):  # and keeps saying so
            await within(backend.next_published(), 5)
        await within(backend.disconnect())
        await within(backend.connect())
        await within(backend.subscribe(a))
        await within(backend.publish(a, "again"))
        assert await receive(backend, 1) == [(a, "again")]


async def test_postgres_keepalive_notices_a_listener_that_stops_answering(pg_url: str) -> None:
    # A server that stops answering without closing the connection (a
    # half-open TCP connection, a hung host): pause the listener's backend.
    async with postgres_backend(pg_url, keepalive=0.1, timeout=0.5) as backend:
        pid = await listener_pid(pg_url)
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(ConnectionError, match="stopped answering"):
                await within(backend.next_published(), 5)
            assert time.monotonic() - started < 5
        finally:
            os.kill(pid, signal.SIGCONT)


# --- Kafka ---------------------------------------------------------------------------


async def test_kafka_topics_have_one_partition(kafka_url: str) -> None:  # noqa: F811
    from aiokafka.admin import AIOKafkaAdminClient

    backend = KafkaBackend(kafka_url)
    await within(backend.connect())
    try:
        subscribed, published = room_channel(tagged("sub")), room_channel(tagged("pub_:"))
        await within(backend.subscribe(subscribed))
        await within(backend.publish(subscribed, "hello"))
        assert await receive(backend, 1) == [(subscribed, "hello")]
        await within(backend.publish(published, "nobody listens"))
    finally:
        await within(backend.disconnect())
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_url.removeprefix("kafka://"))
    await within(admin.start())
    try:
        topics = [topic_name(subscribed), topic_name(published)]
        described = await within(admin.describe_topics(topics))
    finally:
        await within(admin.close())
    assert sorted(t["topic"] for t in described) == sorted(topics)
    for topic in described:
        assert topic["error_code"] == 0
        assert [p["partition"] for p in topic["partitions"]] == [0], topic


async def test_kafka_broker_loss_raises_then_reconnects() -> None:
    server = await within(asyncio.to_thread(start_tansu), 60)
    backend = KafkaBackend(server.url, health_interval=0.2, timeout=2.0)
    try:
        await within(backend.connect())
        a = room_channel(tagged())
        await within(backend.subscribe(a))
        await within(backend.publish(a, "before"))
        assert await receive(backend, 1) == [(a, "before")]
        waiting = asyncio.ensure_future(backend.next_published())
        await within(asyncio.to_thread(server.kill), 30)
        started = time.monotonic()
        with pytest.raises(ConnectionError, match="lost the Kafka cluster"):
            await within(waiting, 10)
        assert time.monotonic() - started < 10
        # Back on the same port, empty (in-memory storage): topics are created again.
        await within(asyncio.to_thread(server.start), 60)
        await within(backend.disconnect())
        await within(backend.connect())
        await within(backend.subscribe(a))
        await within(backend.publish(a, "after"))
        assert await receive(backend, 1) == [(a, "after")]
    finally:
        await within(backend.disconnect())
        await within(asyncio.to_thread(server.stop), 30)


# --- the transport's supervisor, over every broker ---------------------------------


@dataclass
class Outage:
    """A broker of the test's own, and how to cut it off and bring it back."""

    backend: BroadcastBackend
    cut: Callable[[], Awaitable[None]]
    restore: Callable[[], Awaitable[None]]
    stop: Callable[[], Awaitable[None]]


async def redis_outage() -> Outage:
    server = await within(asyncio.to_thread(start_redis), 30)
    current = [server]

    async def restore() -> None:
        current[0] = await within(asyncio.to_thread(start_redis, current[0]), 30)

    return Outage(
        RedisBroker(server.url),
        lambda: within(asyncio.to_thread(current[0].stop, keep_data=True), 30),
        restore,
        lambda: within(asyncio.to_thread(current[0].stop), 30),
    )


async def postgres_outage(url: str) -> Outage:
    async def cut() -> None:  # the listening connection ends; the server stays up
        await terminate(url, await listener_pid(url))

    async def nothing() -> None:
        pass

    return Outage(PostgresBackend(url), cut, nothing, nothing)


async def kafka_outage() -> Outage:
    server = await within(asyncio.to_thread(start_tansu), 60)
    return Outage(
        KafkaBackend(server.url, health_interval=0.2, timeout=2.0),
        lambda: within(asyncio.to_thread(server.kill), 30),
        lambda: within(asyncio.to_thread(server.start), 60),
        lambda: within(asyncio.to_thread(server.stop), 30),
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["redis", "postgres", "kafka"])
async def test_the_transport_reconnects_and_subscribes_again_after_the_broker_is_lost(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """The contract with engine.transport: next_published() raises, and the supervisor
    reconnects and subscribes again to every channel."""
    if kind == "postgres":
        outage = await postgres_outage(
            await fresh_database(request.getfixturevalue("postgres_url"))
        )
    else:
        outage = await (redis_outage() if kind == "redis" else kafka_outage())
    received: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    transport = Transport(
        outage.backend, lambda channel, message: received.put_nowait((channel, message))
    )
    try:
        await within(transport.connect())
        a = room_channel(tagged())
        await within(transport.subscribe(a))
        await within(transport.publish(a, "before"))
        assert await within(received.get()) == (a, "before")
        await outage.cut()
        deadline = time.monotonic() + TIMEOUT
        while transport.connected:
            assert time.monotonic() < deadline, "the transport never noticed"
            await asyncio.sleep(0.02)  # polling, bounded by the deadline
        await outage.restore()
        while not (transport.reconnects == 1 and transport.ready):
            assert time.monotonic() < deadline + TIMEOUT, "the transport never reconnected"
            await asyncio.sleep(0.02)  # polling, bounded by the deadline
        await within(transport.publish(a, "after"))
        assert await within(received.get()) == (a, "after")
    finally:
        await within(transport.disconnect())
        await outage.stop()


# --- channel names ---------------------------------------------------------------------

rooms = st.text(alphabet=ROOM_CHARS, min_size=1, max_size=64)
channels = st.one_of(rooms.map(room_channel), st.just(CONTROL_CHANNEL))
TOPIC = re.compile(r"[a-zA-Z0-9.-]{1,249}")  # "_" is allowed by Kafka, never made by us


@settings(max_examples=2000)
@given(channels)
def test_postgres_channel_names_round_trip(channel: str) -> None:
    name = pg_channel(channel)
    assert 1 <= len(name.encode()) <= 63
    assert name.isascii() and name.isprintable() and '"' not in name
    assert backend_postgres.channel_name(name) == channel  # so pg_channel is injective
    assert (name == channel) == (len(channel) <= 63)


@settings(max_examples=2000)
@given(channels, channels)
def test_postgres_channel_names_are_injective(one: str, two: str) -> None:
    assert (pg_channel(one) == pg_channel(two)) == (one == two)


@settings(max_examples=2000)
@given(channels)
def test_kafka_topic_names_round_trip(channel: str) -> None:
    topic = topic_name(channel)
    assert TOPIC.fullmatch(topic) and topic not in (".", "..")
    assert backend_kafka.channel_name(topic) == channel  # so topic_name is injective


@settings(max_examples=2000)
@given(channels, channels)
def test_kafka_topic_names_do_not_collide_even_for_kafka(one: str, two: str) -> None:
    # Kafka refuses a topic equal to an existing one up to "." versus "_".
    def collision_key(channel: str) -> str:
        return topic_name(channel).replace(".", "_")

    assert (collision_key(one) == collision_key(two)) == (one == two)


def test_channel_names_at_the_edges() -> None:
    # The packing's alphabets: the 66 characters of channels, 89 printable digits.
    assert len(backend_postgres.ALPHABET) == 66 and len(backend_postgres._DIGITS) == 89
    for room in edge_rooms():
        channel = room_channel(room)
        assert backend_postgres.channel_name(pg_channel(channel)) == channel
        assert backend_kafka.channel_name(topic_name(channel)) == channel
    assert len(pg_channel(room_channel("z" * 64))) == 63  # the largest fits exactly
    assert pg_channel("r.lobby") == "r.lobby"  # short names stay readable
    assert topic_name("r.my_room:1") == "r.my-uroom-c1"
    assert len({pg_channel(room_channel(r)) for r in edge_rooms()}) == len(edge_rooms())
    assert len({topic_name(room_channel(r)) for r in edge_rooms()}) == len(edge_rooms())


@pytest.mark.parametrize("mapping", [pg_channel, topic_name])
@pytest.mark.parametrize("channel", ["", "r.lobby room", "r.é", 'r."', "r.#"])
def test_channel_names_outside_the_alphabet_are_refused(
    mapping: Callable[[str], str], channel: str
) -> None:
    with pytest.raises(ValueError, match=re.escape("A-Z a-z 0-9 _ - . :")):
        mapping(channel)


def test_postgres_channel_names_longer_than_packing_allows_are_refused() -> None:
    pg_channel("r." + "z" * 64)
    with pytest.raises(ValueError, match="too long for a Postgres channel"):
        pg_channel("r." + "z" * 65)


def test_urls_are_checked() -> None:
    with pytest.raises(ValueError, match="BROADCAST_URL"):
        PostgresBackend("redis://localhost")
    with pytest.raises(ValueError, match="BROADCAST_URL"):
        KafkaBackend("kafka://")
    with pytest.raises(ValueError, match="replication_factor"):
        KafkaBackend("kafka://h:9092?replication_factor=x")
    backend = KafkaBackend("kafka://h1,h2:9093?replication_factor=3")
    assert backend.servers == ["h1:9092", "h2:9093"]
    assert backend.replication_factor == 3
