"""A hub in process on the memory store and local presence, over the broker a test picks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from roomcast.backends.broker.base import Broker
from roomcast.backends.history.memory import MemoryStore
from roomcast.backends.presence.local import LocalPresence
from roomcast.engine.hub import Hub
from roomcast.settings import Settings


@asynccontextmanager
async def started_hub(broker: Broker) -> AsyncIterator[Hub]:
    settings = Settings()
    hub = Hub(
        settings, MemoryStore(settings.history_size, settings.history_ttl), LocalPresence(), broker
    )
    await hub.start()
    try:
        yield hub
    finally:
        await hub.stop()
