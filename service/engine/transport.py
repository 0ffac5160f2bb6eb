"""The broadcast transport: a broker (a broadcaster backend), with a listener we own.

broadcaster's `Broadcast` puts every event into unbounded per-subscriber
queues from a listener that dies silently, and its `subscribe()` races with
its `unsubscribe()` on the same channel. We keep its backends (memory, Redis,
Postgres, Kafka: the part that talks to brokers) and own the rest: one
listener that hands each event synchronously to the hub (which puts it into
bounded outboxes), and subscribe/unsubscribe operations serialized per
channel so that a re-join never overtakes the unsubscribe of a previous
member.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from ..backends.broker.base import Broker, max_payload
from ..observe import metrics
from ..tasks import stop_if_cancelled

log = logging.getLogger("roomcast.transport")

OnMessage = Callable[[str, str], None]

RECONNECT_FIRST_DELAY = 0.1
RECONNECT_MAX_DELAY = 5.0

ROOM_PREFIX = "r."
CONTROL_CHANNEL = "c.users"


def room_channel(room: str) -> str:
    # Room names never contain the prefix separator's meaning: "r." is ours,
    # control channels start with "c.", so the mapping stays injective.
    return ROOM_PREFIX + room


class Transport:
    """Owns the backend connection and the one listener, which it supervises:
    when the broker connection fails, it reconnects with backoff, subscribes
    again to every channel and calls `on_reconnect`, so that the hub can fill
    what was published meanwhile from history."""

    def __init__(
        self,
        backend: Broker,
        on_message: OnMessage,
        on_reconnect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.backend = backend
        self.on_message = on_message
        self.on_reconnect = on_reconnect
        self.connected = False
        self.reconnects = 0
        self._listener: asyncio.Task[None] | None = None
        self._ops: dict[str, asyncio.Task[None]] = {}
        self.subscribed: set[str] = set()
        # The largest envelope the broker carries (Postgres NOTIFY), if it has a limit.
        self.max_payload = max_payload(backend)

    @property
    def ready(self) -> bool:
        return self.connected and self._listener is not None and not self._listener.done()

    async def connect(self) -> None:
        await self.backend.connect()
        self.connected = True
        self._listener = asyncio.create_task(self._listen(), name="roomcast-listener")

    async def disconnect(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        await self.settled()
        self.connected = False
        await self.backend.disconnect()

    async def _listen(self) -> None:
        while True:
            stop_if_cancelled()
            try:
                event = await self.backend.next_published()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected = False
                log.warning("lost the broadcast backend (%r): reconnecting", exc)
                await self._reconnect()
                continue
            try:
                self.on_message(event.channel, event.message)
            except Exception:
                log.exception("fan-out failed on channel %s", event.channel)

    async def _reconnect(self) -> None:
        delay = RECONNECT_FIRST_DELAY
        while True:
            stop_if_cancelled()
            # Backoff between attempts against a broker that is down.
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_DELAY)
            try:
                with contextlib.suppress(Exception):
                    await self.backend.disconnect()
                await self.backend.connect()
                for channel in list(self.subscribed):
                    await self.backend.subscribe(channel)
            except Exception as exc:
                log.warning("broadcast backend still unavailable (%r)", exc)
                continue
            self.connected = True
            self.reconnects += 1
            metrics.BROKER_RECONNECTS.inc()
            log.info("broadcast backend reconnected")
            if self.on_reconnect is not None:
                try:
                    await self.on_reconnect()
                except Exception:
                    log.exception("catching up after the reconnect failed")
            return

    async def publish(self, channel: str, message: str) -> None:
        await self.backend.publish(channel, message)

    def subscribe(self, channel: str) -> asyncio.Task[None]:
        return self._serialized(channel, self._subscribe, channel)

    def unsubscribe(self, channel: str) -> asyncio.Task[None]:
        return self._serialized(channel, self._unsubscribe, channel)

    async def _subscribe(self, channel: str) -> None:
        if channel not in self.subscribed:
            await self.backend.subscribe(channel)
            self.subscribed.add(channel)
            if channel != CONTROL_CHANNEL:
                metrics.SUBSCRIPTIONS.inc()

    async def _unsubscribe(self, channel: str) -> None:
        if channel in self.subscribed:
            self.subscribed.discard(channel)
            if channel != CONTROL_CHANNEL:
                metrics.SUBSCRIPTIONS.dec()
            await self.backend.unsubscribe(channel)

    def _serialized(
        self, channel: str, op: Callable[[str], Awaitable[None]], arg: str
    ) -> asyncio.Task[None]:
        previous = self._ops.get(channel)

        async def run() -> None:
            if previous is not None:
                await asyncio.wait([previous])
            await op(arg)

        task = asyncio.create_task(run())
        self._ops[channel] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._ops.get(channel) is done:
                del self._ops[channel]
            if not done.cancelled() and (exc := done.exception()) is not None:
                log.warning("%s of %s failed: %r", op.__name__.strip("_"), channel, exc)

        task.add_done_callback(forget)
        return task

    async def settled(self) -> None:
        """Wait until every subscribe and unsubscribe issued so far is done."""
        while self._ops:
            await asyncio.wait(list(self._ops.values()))
