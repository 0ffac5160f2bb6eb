"""The broker contract: encode/broadcaster's `BroadcastBackend`, as a Protocol.

Any broadcaster backend fits it, and roomcast's own backends are broadcaster
backends (they subclass its public `BroadcastBackend`), so they also work
under `broadcaster.Broadcast(backend=...)`. roomcast reads a broker through
its own supervised listener (`engine.transport`), never through `Broadcast`.

Beyond broadcaster's contract, a broker may say that it carries at most
`max_payload` bytes per message (Postgres NOTIFY does): envelopes larger than
that are refused before they are stored.
"""

from __future__ import annotations

from typing import Any, Protocol

from broadcaster import BroadcastBackend, Event

__all__ = ["BroadcastBackend", "Broker", "Event", "max_payload"]


class Broker(Protocol):
    async def connect(self) -> None: ...

    async def disconnect(self) -> None: ...

    async def subscribe(self, channel: str) -> None:
        """From now on, `next_published()` returns what is published on `channel`."""
        ...

    async def unsubscribe(self, channel: str) -> None: ...

    async def publish(self, channel: str, message: Any) -> None: ...

    async def next_published(self) -> Event:
        """The next message on a subscribed channel; raises when the broker is lost."""
        ...


def max_payload(broker: Broker) -> int | None:
    """The largest message `broker` carries, in bytes, if it has a limit."""
    limit = getattr(broker, "max_payload", None)
    return limit if isinstance(limit, int) else None
