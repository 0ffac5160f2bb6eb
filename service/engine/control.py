"""Requests to every worker on the control channel, each answered with a tally.

`notify_user` and `disconnect_user` reach a user's connections wherever they
are: the asking worker publishes the request with an id, every worker acts
on its own connections and answers how many it reached, and the asker sums
the answers until every live worker (those holding a presence lease) has
answered, or TALLY_TIMEOUT passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Mapping
from typing import Final

import msgspec

from ..backends.presence.base import PresenceStore
from ..observe import metrics
from .connection import Connection
from .frames import Frame
from .sequencer import Spawn
from .transport import CONTROL_CHANNEL, Transport

log = logging.getLogger("roomcast.hub")

# How long a request waits for every worker to say how many connections it reached.
TALLY_TIMEOUT: Final = 2.0


class UserDelivery(msgspec.Struct, tag="user", tag_field="kind"):
    """A frame for (or a close of) one user's connections. With `ask`, every
    worker answers with a `Tally` of the connections it reached."""

    user: str
    frame: str | None = None
    close: int | None = None
    ask: str | None = None


class Tally(msgspec.Struct, tag="tally", tag_field="kind"):
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


_decoder = msgspec.json.Decoder(UserDelivery | Tally)
_encoder = msgspec.json.Encoder()


class Control:
    def __init__(
        self,
        transport: Transport,
        presence: PresenceStore,
        users: Mapping[str, set[Connection]],
        spawn: Spawn,
    ) -> None:
        self.transport = transport
        self.presence = presence
        self.users = users
        self.spawn = spawn
        self._counts: dict[str, _Count] = {}

    async def ask(self, delivery: UserDelivery) -> int:
        """Publish `delivery` and sum the workers' answers. A worker that does not
        answer within TALLY_TIMEOUT (it is dying) is left out of the sum."""
        delivery.ask = secrets.token_hex(8)
        count = self._counts[delivery.ask] = _Count(await self.presence.workers())
        try:
            await self._publish(delivery)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TALLY_TIMEOUT):
                    await count.done.wait()
            return count.total
        finally:
            del self._counts[delivery.ask]

    async def _publish(self, message: UserDelivery | Tally) -> None:
        await self.transport.publish(CONTROL_CHANNEL, _encoder.encode(message).decode())

    def receive(self, text: str) -> None:
        """A message on the control channel (synchronous: called by the listener)."""
        message = _decoder.decode(text)
        if isinstance(message, Tally):
            self._counted(message)
        else:
            self._deliver(message)

    def _deliver(self, delivery: UserDelivery) -> None:
        reached = 0
        frame = None if delivery.frame is None else Frame(delivery.frame)
        for conn in list(self.users.get(delivery.user, ())):
            pushed = frame is None or conn.push(frame)
            if delivery.close is not None:
                conn.close_after_queued(delivery.close)
            if pushed or delivery.close is not None:
                reached += 1
        if delivery.frame is not None and delivery.close is None:
            metrics.DELIVERIES.inc(reached)
        if delivery.ask is not None:
            self.spawn(self._answer(Tally(delivery.ask, reached)))

    async def _answer(self, tally: Tally) -> None:
        try:
            await self._publish(tally)
        except Exception as exc:  # the asking worker times out and leaves this one out
            log.warning("tally for %s not published: %r", tally.answer, exc)

    def _counted(self, tally: Tally) -> None:
        count = self._counts.get(tally.answer)
        if count is not None:
            count.total += tally.count
            count.answers += 1
            if count.answers >= count.expected:
                count.done.set()
