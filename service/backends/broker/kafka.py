"""Kafka as a broadcast backend, for `kafka://host:port[,host:port…]` URLs.

broadcaster's own Kafka backend drops every topic when one is unsubscribed
(upstream issue #65), lets the broker auto-create topics (with several
partitions, which loses a room's order), returns from `subscribe()` before
the consumer knows where it starts reading, and waits forever in
`next_published()` once the broker is gone. Here:

- every channel is one topic with one partition, created explicitly (an
  existing topic is fine), written and read at partition 0 only, so a room
  keeps its order even on a topic that someone else created wider;
- the consumer (no group: every worker reads everything it subscribed) is
  assigned its partitions by hand; `subscribe()` returns once the new
  partition's position is fixed at the end of the log (live messages only:
  history comes from the history store), and changing the assignment keeps
  the positions of the other partitions, so nothing is lost or repeated;
- a watchdog asks the cluster for its metadata every `health_interval`
  seconds; after `health_failures` failures in a row `next_published()`
  raises `ConnectionError`, and the transport's supervisor reconnects;
- channel names map injectively onto topic names (`topic_name`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qs, urlparse

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    TopicPartition,
)
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

from ...tasks import stop_if_cancelled
from ..urls import safe_url
from .base import BroadcastBackend, Event
from .turns import Turns

log = logging.getLogger("roomcast.backend.kafka")

DEFAULT_PORT: Final = 9092
POLL_SECONDS: Final = 0.5  # how often a waiting next_published() looks at the watchdog

# --- topic names -------------------------------------------------------------------
#
# Topic names allow [a-zA-Z0-9._-], and Kafka refuses a topic whose name
# equals an existing one once "." and "_" are taken as the same character
# (they meet in metric names). So topics never contain "_": "-" is an escape
# character, and a channel maps character by character:
#
#     "-" -> "--"    "_" -> "-u"    ":" -> "-c"    any other -> itself
#
# Injective: these codewords form a prefix code (those starting with "-" are
# two characters long and differ in the second; the others are one character
# other than "-"), so a topic splits into codewords in exactly one way, which
# `channel_name` does. With no "_" in any topic, replacing "." by "_" is
# injective too, so two rooms never collide on Kafka. A 64-character room
# makes at most 2 + 2 * 64 = 130 characters, well below the limit of 249.

ALPHABET: Final = frozenset("-.0123456789:ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz")
MAX_TOPIC_CHARS: Final = 249
_ESCAPE: Final = {"-": "--", "_": "-u", ":": "-c"}
_UNESCAPE: Final = {code[1]: char for char, code in _ESCAPE.items()}


def topic_name(channel: str) -> str:
    """The Kafka topic of a transport channel: injective, without "_"."""
    if not channel or any(c not in ALPHABET for c in channel):
        raise ValueError(
            f"channel {channel!r}: a Kafka broadcast channel is 1 or more of A-Z a-z 0-9 _ - . :"
        )
    topic = "".join(_ESCAPE.get(c, c) for c in channel)
    if len(topic) > MAX_TOPIC_CHARS or topic in (".", ".."):
        raise ValueError(f"channel {channel!r} makes no valid Kafka topic ({topic!r})")
    return topic


def channel_name(topic: str) -> str:
    """The inverse of `topic_name`."""
    chars: list[str] = []
    escaped = False
    for c in topic:
        if escaped:
            chars.append(_UNESCAPE[c])
            escaped = False
        elif c == "-":
            escaped = True
        else:
            chars.append(c)
    if escaped:
        raise ValueError(f"topic {topic!r} does not come from topic_name()")
    return "".join(chars)


# --- the backend -----------------------------------------------------------------


@dataclass(eq=False)
class _Session:
    """One connect(): the clients, what they have set up, and whether the broker is gone."""

    producer: Any  # AIOKafkaProducer
    consumer: Any  # AIOKafkaConsumer
    admin: Any  # AIOKafkaAdminClient
    topics: set[str] = field(default_factory=set)  # assigned to the consumer
    positions: dict[Any, int] = field(default_factory=dict)  # TopicPartition: next offset
    created: set[str] = field(default_factory=set)  # known to exist
    assigning: asyncio.Lock = field(default_factory=asyncio.Lock)
    creating: asyncio.Lock = field(default_factory=asyncio.Lock)
    turns: Turns = field(default_factory=Turns)
    received: deque[Event] = field(default_factory=deque)
    lost: ConnectionError | None = None
    watchdog: asyncio.Task[None] | None = None


class KafkaBroker(BroadcastBackend):
    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        health_interval: float = 1.0,
        health_failures: int = 2,
        fetch_max_wait: float = 0.1,
    ) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "kafka" or not parsed.netloc:
            raise ValueError(
                f"BROADCAST_URL={safe_url(url)!r}: expected kafka://host:port[,host:port...]"
            )
        self.servers = [
            server if ":" in server else f"{server}:{DEFAULT_PORT}"
            for server in parsed.netloc.split(",")
        ]
        query = parse_qs(parsed.query)
        try:
            self.replication_factor = int(query.get("replication_factor", ["1"])[-1])
        except ValueError:
            raise ValueError(
                f"BROADCAST_URL={safe_url(url)!r}: replication_factor must be an integer"
            ) from None
        self.timeout = timeout
        self.health_interval = health_interval
        self.health_failures = health_failures
        # Kafka answers a waiting fetch as soon as data arrives; Tansu waits
        # the whole time, which then bounds the latency (half of it on average).
        self.fetch_max_wait = fetch_max_wait
        self._session: _Session | None = None

    async def connect(self) -> None:
        if self._session is not None:
            await self.disconnect()
        options: dict[str, Any] = {
            "bootstrap_servers": self.servers,
            "request_timeout_ms": int(self.timeout * 1000),
        }
        producer = AIOKafkaProducer(**options, acks=1, linger_ms=0)
        consumer = AIOKafkaConsumer(
            **options,
            group_id=None,
            auto_offset_reset="latest",
            fetch_max_wait_ms=int(self.fetch_max_wait * 1000),
        )
        admin = AIOKafkaAdminClient(**options)
        session = _Session(producer, consumer, admin)
        started: list[Any] = []
        try:
            for client in (producer, consumer, admin):
                async with asyncio.timeout(self.timeout):
                    await client.start()
                started.append(client)
            consumer.assign([])
        except BaseException:
            for client in started:
                await self._stop(client)
            raise
        session.watchdog = asyncio.create_task(self._watch(session), name="roomcast-kafka-watchdog")
        self._session = session

    async def disconnect(self) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        session.lost = ConnectionError("disconnected")
        if session.watchdog is not None:
            session.watchdog.cancel()
            await asyncio.gather(session.watchdog, return_exceptions=True)
        for client in (session.consumer, session.producer, session.admin):
            await self._stop(client)

    async def _stop(self, client: Any) -> None:
        # In its own task: aiokafka's stop() can raise CancelledError when a
        # fetch was retrying (its task is cancelled and then awaited), which
        # must not look like the cancellation of our caller.
        stopping = asyncio.ensure_future(
            client.close() if isinstance(client, AIOKafkaAdminClient) else client.stop()
        )
        done, _ = await asyncio.wait([stopping], timeout=self.timeout)
        if not done:
            stopping.cancel()
            log.warning("stopping %s timed out", type(client).__name__)
        elif not stopping.cancelled() and (exc := stopping.exception()) is not None:
            log.debug("stopping %s: %r", type(client).__name__, exc)

    def _connected(self) -> _Session:
        if self._session is None:
            raise ConnectionError("the Kafka broadcast backend is not connected")
        if self._session.lost is not None:
            raise self._session.lost
        return self._session

    async def subscribe(self, channel: str) -> None:
        session = self._connected()
        topic = topic_name(channel)
        async with session.assigning:
            if topic in session.topics:
                return
            await self._ensure_topic(session, topic)
            self._assign(session, session.topics | {topic})
            tp = TopicPartition(topic, 0)
            try:
                # Fix the position at the end of the log now: what is published
                # after subscribe() returns is delivered.
                async with asyncio.timeout(self.timeout):
                    position = await session.consumer.position(tp)
            except BaseException:
                self._assign(session, session.topics - {topic})
                raise
            # next_published() may have moved it on meanwhile
            session.positions[tp] = max(position, session.positions.get(tp, 0))

    async def unsubscribe(self, channel: str) -> None:
        session = self._connected()
        topic = topic_name(channel)
        async with session.assigning:
            if topic in session.topics:
                self._assign(session, session.topics - {topic})

    def _assign(self, session: _Session, topics: set[str]) -> None:
        # The consumer only takes whole assignments, and a new one starts
        # every partition afresh (at the end of the log): put those we keep
        # back where they were. Their positions are ours, not the consumer's
        # (which can only be read with an await, letting next_published()
        # consume meanwhile), so reading and assigning happen at once.
        kept = {tp: at for tp, at in session.positions.items() if tp.topic in topics}
        session.consumer.assign([TopicPartition(topic, 0) for topic in sorted(topics)])
        for tp, at in kept.items():
            session.consumer.seek(tp, at)
        session.positions = kept
        session.topics = set(topics)

    async def _ensure_topic(self, session: _Session, topic: str) -> None:
        if topic in session.created:
            return
        async with session.creating:
            if topic in session.created:
                return
            new = NewTopic(topic, num_partitions=1, replication_factor=self.replication_factor)
            try:
                async with asyncio.timeout(self.timeout):
                    response = await session.admin.create_topics([new])
            except TopicAlreadyExistsError:
                pass
            else:
                for error in response.topic_errors:
                    code, message = error[1], error[2] if len(error) > 2 else None
                    if code not in (0, TopicAlreadyExistsError.errno):
                        raise for_code(code)(f"creating the topic {topic!r}: {message}")
            session.created.add(topic)

    async def publish(self, channel: str, message: Any) -> None:
        if not isinstance(message, str):
            raise TypeError(f"message must be str, not {type(message).__name__}")
        session = self._connected()
        topic = topic_name(channel)
        await self._ensure_topic(session, topic)
        # Queue in call order, then wait for the broker outside the turn, so
        # that publishes to one topic keep their order and still share batches.
        async with session.turns.turn(topic):
            sent = await session.producer.send(topic, message.encode(), partition=0)
        async with asyncio.timeout(self.timeout):
            await sent

    async def next_published(self) -> Event:
        session = self._connected()
        while not session.received:
            stop_if_cancelled()
            if session.lost is not None:
                raise session.lost
            batches = await session.consumer.getmany(timeout_ms=int(POLL_SECONDS * 1000))
            for tp, records in batches.items():
                if records and tp.topic in session.topics:
                    session.positions[tp] = records[-1].offset + 1
                session.received.extend(
                    Event(channel=channel_name(record.topic), message=record.value.decode())
                    for record in records
                    if record.value is not None
                )
        return session.received.popleft()

    async def _watch(self, session: _Session) -> None:
        # Without a consumer group nothing in aiokafka gives up on a broker
        # that is gone: fetches are retried forever. Ask the cluster ourselves.
        failures = 0
        while True:
            stop_if_cancelled()
            await asyncio.sleep(self.health_interval)
            try:
                async with asyncio.timeout(self.timeout):
                    await session.admin.describe_cluster()
            except Exception as exc:
                failures += 1
                if failures >= self.health_failures:
                    session.lost = ConnectionError(
                        f"lost the Kafka cluster at {','.join(self.servers)}: {exc!r}"
                    )
                    return
            else:
                failures = 0
