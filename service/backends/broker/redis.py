"""Redis pub/sub as a broadcaster backend that fails loudly.

broadcaster 0.3.1's Redis backend reads pub/sub in a task of its own that
ends silently when the connection drops (and, with redis-py 8, never starts
delivering): `next_published()` then waits forever. This one reads pub/sub
inside `next_published()` itself, with redis-py's retries off, so a lost
connection raises there and roomcast's transport reconnects, subscribes again
and fills the gap from history.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, cast

from redis import asyncio as redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ...tasks import stop_if_cancelled
from ..urls import split_prefix
from .base import BroadcastBackend, Event


class RedisBroker(BroadcastBackend):
    def __init__(self, url: str) -> None:
        self._url, prefix = split_prefix(url, "BROADCAST_URL")
        self._prefix = prefix + ":"
        self._redis: redis.Redis | None = None
        self._pubsub: PubSub | None = None
        self._has_channels = asyncio.Event()

    async def connect(self) -> None:
        client = redis.Redis.from_url(
            self._url, retry=Retry(NoBackoff(), 0), health_check_interval=10
        )
        await cast(Awaitable[bool], client.ping())
        self._redis = client
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._has_channels.clear()

    async def disconnect(self) -> None:
        pubsub, client = self._pubsub, self._redis
        self._pubsub = self._redis = None
        self._has_channels.set()  # release a reader waiting for a first channel
        if pubsub is not None:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
        if client is not None:
            await client.aclose()

    def _live(self) -> tuple[redis.Redis, PubSub]:
        if self._redis is None or self._pubsub is None:
            raise ConnectionError("the Redis broadcast backend is not connected")
        return self._redis, self._pubsub

    async def subscribe(self, channel: str) -> None:
        _, pubsub = self._live()
        await pubsub.subscribe(self._prefix + channel)
        self._has_channels.set()

    async def unsubscribe(self, channel: str) -> None:
        _, pubsub = self._live()
        await pubsub.unsubscribe(self._prefix + channel)

    async def publish(self, channel: str, message: Any) -> None:
        client, _ = self._live()
        await client.publish(self._prefix + channel, message)

    async def next_published(self) -> Event:
        skip = len(self._prefix)
        while True:
            stop_if_cancelled()
            await self._has_channels.wait()
            _, pubsub = self._live()
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
            if message is not None and message["type"] == "message":
                return Event(message["channel"].decode()[skip:], message["data"].decode())
