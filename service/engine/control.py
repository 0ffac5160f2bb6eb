"""Requests to every worker on the control channel, each answered by every worker.

The asking worker publishes a request with a fresh id; every worker that
shares the broker acts on it and publishes its answer (a JSON payload), and
the asker gathers the answers until every live worker (those holding a
presence lease) has answered, or ANSWER_TIMEOUT passes. Two kinds of request:

- `UserDelivery`: a frame for, or a close of, one user's connections
  (`notify_user`, `disconnect_user`); each worker answers how many
  connections it reached, and the asker sums them.
- `Query`: a named question (`what`) with parameters; each worker answers
  with what the responder registered under that name returns (its figures
  for the admin's stats, its rooms), and the asker merges them.

An answer larger than the broker carries (Postgres NOTIFY) is sent in parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Mapping
from typing import Final

import msgspec

from ..backends.presence.base import PresenceStore
from .connection import Connection
from .frames import Frame
from .rates import Deliveries
from .sequencer import Spawn
from .transport import CONTROL_CHANNEL, Transport

log = logging.getLogger("roomcast.hub")

# How long a request waits for every worker to answer.
ANSWER_TIMEOUT: Final = 2.0
# Room for an answer's other fields when it is cut into parts.
_PART_OVERHEAD: Final = 256

Responder = Callable[[msgspec.Raw], bytes]


class UserDelivery(msgspec.Struct, tag="user", tag_field="kind"):
    """A frame for (or a close of) one user's connections. With `ask`, every
    worker answers how many connections it reached."""

    user: str
    frame: str | None = None
    close: int | None = None
    ask: str | None = None


class Query(msgspec.Struct, tag="query", tag_field="kind"):
    """A question every worker answers with the JSON its responder for `what` returns."""

    what: str
    params: msgspec.Raw = msgspec.Raw(b"null")
    ask: str = ""


class Answer(msgspec.Struct, tag="answer", tag_field="kind"):
    """One worker's answer to `answer` (a request's id): `body` is its JSON, or
    part `part` of `parts` of it."""

    answer: str
    worker: str
    body: str
    part: int = 0
    parts: int = 1


class _Answers:
    """The answers to one request, gathered until every live worker has answered."""

    __slots__ = ("bodies", "done", "expected", "partial", "workers")

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.bodies: list[str] = []
        self.workers: set[str] = set()  # who answered (a broker may deliver twice)
        self.partial: dict[str, dict[int, str]] = {}
        self.done = asyncio.Event()

    def add(self, answer: Answer) -> None:
        if answer.worker in self.workers:
            return
        body = answer.body
        if answer.parts > 1:
            parts = self.partial.setdefault(answer.worker, {})
            parts[answer.part] = body
            if len(parts) < answer.parts:
                return
            body = "".join(parts[i] for i in range(answer.parts))
            del self.partial[answer.worker]
        self.workers.add(answer.worker)
        self.bodies.append(body)
        if len(self.bodies) >= self.expected:
            self.done.set()


_decoder = msgspec.json.Decoder(UserDelivery | Query | Answer)
_encoder = msgspec.json.Encoder()


class Control:
    def __init__(
        self,
        transport: Transport,
        presence: PresenceStore,
        users: Mapping[str, set[Connection]],
        spawn: Spawn,
        deliveries: Deliveries,
    ) -> None:
        self.transport = transport
        self.presence = presence
        self.users = users
        self.spawn = spawn
        self.deliveries = deliveries
        self.worker = secrets.token_hex(8)
        # What this worker answers to each kind of `Query`.
        self.responders: dict[str, Responder] = {}
        self._pending: dict[str, _Answers] = {}

    async def ask(self, request: UserDelivery | Query) -> list[str]:
        """Publish `request` and gather every worker's answer (the JSON texts). A
        worker that does not answer within ANSWER_TIMEOUT (it is dying) is left out."""
        request.ask = ask = secrets.token_hex(8)
        answers = self._pending[ask] = _Answers(await self.presence.workers())
        try:
            await self._publish(request)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ANSWER_TIMEOUT):
                    await answers.done.wait()
            return answers.bodies
        finally:
            del self._pending[ask]

    async def count(self, delivery: UserDelivery) -> int:
        """Deliver to a user on every worker; how many connections it reached."""
        return sum(int(body) for body in await self.ask(delivery))

    async def _publish(self, message: UserDelivery | Query | Answer) -> None:
        await self.transport.publish(CONTROL_CHANNEL, _encoder.encode(message).decode())

    def receive(self, text: str) -> None:
        """A message on the control channel (synchronous: called by the listener)."""
        message = _decoder.decode(text)
        if isinstance(message, Answer):
            answers = self._pending.get(message.answer)
            if answers is not None:
                answers.add(message)
        elif isinstance(message, Query):
            respond = self.responders.get(message.what)
            if respond is not None:
                self.spawn(self._answer(message.ask, respond(message.params).decode()))
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
            self.deliveries.add(reached)
        if delivery.ask is not None:
            self.spawn(self._answer(delivery.ask, str(reached)))

    def _parts(self, ask: str, body: str) -> list[Answer]:
        whole = Answer(ask, self.worker, body)
        limit = self.transport.max_payload
        if limit is None or len(_encoder.encode(whole)) <= limit:
            return [whole]
        # A character takes at most 6 bytes in a JSON string (`\u001f`).
        size = max(1, (limit - _PART_OVERHEAD) // 6)
        pieces = [body[i : i + size] for i in range(0, len(body), size)]
        return [Answer(ask, self.worker, p, i, len(pieces)) for i, p in enumerate(pieces)]

    async def _answer(self, ask: str, body: str) -> None:
        try:
            for part in self._parts(ask, body):
                await self._publish(part)
        except Exception as exc:  # the asking worker times out and leaves this one out
            log.warning("answer to %s not published: %r", ask, exc)
