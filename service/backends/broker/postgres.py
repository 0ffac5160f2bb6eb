"""PostgreSQL LISTEN/NOTIFY as a broadcast backend, for `postgres://` URLs.

broadcaster's own Postgres backend LISTENs and NOTIFYs on one connection,
passes channel names through (Postgres cuts identifiers at 63 bytes, so two
long room names would share a channel), lets NOTIFY fail with an obscure
error on payloads of 8000 bytes, and never notices a lost connection: its
`next_published()` then waits forever. Here:

- one dedicated connection LISTENs. Notifications go into a queue that
  `next_published()` reads. When that connection ends (server restart,
  `pg_terminate_backend`, network) or stops answering the keepalive, the
  queue gets a `ConnectionError` that `next_published()` raises, and the
  transport's supervisor reconnects and subscribes again;
- a small pool NOTIFYs (`SELECT pg_notify($1, $2)`), one at a time per
  channel, so a channel's messages keep the order of the `publish()` calls.
  A payload over 7999 bytes raises `ValueError` before reaching the server;
- channel names map injectively onto Postgres channel names (`pg_channel`);
- `?prefix=` (default `roomcast`) separates deployments sharing a database.
  A channel name has no room left for it (a 64-character room already packs
  into 62 characters), so it travels in the payload instead, `prefix␠message`,
  and notifications of another prefix are dropped on arrival.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlparse

import asyncpg

from ...tasks import stop_if_cancelled
from ..urls import safe_url, split_prefix
from .base import BroadcastBackend, Event
from .turns import Turns

log = logging.getLogger("roomcast.backend.postgres")

MAX_PAYLOAD_BYTES: Final = 7999  # NOTIFY wants payloads shorter than 8000 bytes
MAX_IDENTIFIER_BYTES: Final = 63  # NAMEDATALEN - 1: longer identifiers are cut

# --- channel names ---------------------------------------------------------------
#
# The transport's channels ("r.<room>", "c.users") are strings over the 66
# characters of room names. One of at most 63 characters is its own Postgres
# channel: it is quoted, so its case is kept. A longer one (up to 66, that is
# "r." and a 64-character room) becomes PACKED_MARK and its packed form: the
# name read as a bijective base-66 numeral (which gives every string its own
# positive integer, lengths included), written in base 89 with the printable
# ASCII characters other than space, quotes, backslash and PACKED_MARK, in at
# most 62 digits. Injective: PACKED_MARK is not in ALPHABET, so the two forms
# never meet; the first is the identity, the second a bijection followed by
# the unique positional representation of a positive integer. `channel_name`
# inverts it (and the tests check the round trip over every valid name).

ALPHABET: Final = "-.0123456789:ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
PACKED_MARK: Final = "#"
_DIGITS: Final = "".join(c for c in map(chr, range(0x21, 0x7F)) if c not in "\"'\\`" + PACKED_MARK)
_INDEX: Final = {c: i for i, c in enumerate(ALPHABET)}
_DIGIT_INDEX: Final = {c: i for i, c in enumerate(_DIGITS)}


def pg_channel(channel: str) -> str:
    """The Postgres channel of a transport channel: injective, at most 63 bytes."""
    if not channel or any(c not in _INDEX for c in channel):
        raise ValueError(
            f"channel {channel!r}: a Postgres broadcast channel is 1 or more of A-Z a-z 0-9 _ - . :"
        )
    if len(channel) <= MAX_IDENTIFIER_BYTES:
        return channel
    number = 0
    for c in channel:
        number = number * len(ALPHABET) + _INDEX[c] + 1
    digits: list[str] = []
    while number:
        number, digit = divmod(number, len(_DIGITS))
        digits.append(_DIGITS[digit])
    packed = PACKED_MARK + "".join(reversed(digits))
    if len(packed) > MAX_IDENTIFIER_BYTES:
        raise ValueError(
            f"channel {channel!r} of {len(channel)} characters is too long for a "
            "Postgres channel (at most 66 after packing)"
        )
    return packed


def channel_name(pg_name: str) -> str:
    """The inverse of `pg_channel`."""
    if not pg_name.startswith(PACKED_MARK):
        return pg_name
    number = 0
    for c in pg_name[len(PACKED_MARK) :]:
        number = number * len(_DIGITS) + _DIGIT_INDEX[c]
    chars: list[str] = []
    while number:
        number, digit = divmod(number - 1, len(ALPHABET))
        chars.append(ALPHABET[digit])
    return "".join(reversed(chars))


# --- the backend -----------------------------------------------------------------


@dataclass(eq=False)
class _Session:
    """One connect(): its connections, its queue and its callbacks."""

    listener: Any  # asyncpg.Connection
    pool: Any  # asyncpg.Pool
    tag: str  # "<prefix> ": what starts this deployment's payloads
    queue: asyncio.Queue[Event | ConnectionError] = field(default_factory=asyncio.Queue)
    # asyncpg runs one operation at a time per connection: LISTEN, UNLISTEN and
    # the keepalive take turns on the listener.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    turns: Turns = field(default_factory=Turns)
    keepalive: asyncio.Task[None] | None = None

    def on_notification(self, _conn: Any, _pid: int, pg_name: str, payload: str) -> None:
        if payload.startswith(self.tag):  # else: another deployment's (another prefix)
            message = payload[len(self.tag) :]
            self.queue.put_nowait(Event(channel=channel_name(pg_name), message=message))

    def on_termination(self, _conn: Any) -> None:
        self.lost("the Postgres listening connection was closed")

    def lost(self, why: str) -> None:
        self.queue.put_nowait(ConnectionError(why))


class PostgresBroker(BroadcastBackend):
    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 4,
        timeout: float = 10.0,
        keepalive: float = 5.0,
    ) -> None:
        if urlparse(url).scheme not in ("postgres", "postgresql"):
            raise ValueError(
                f"BROADCAST_URL={safe_url(url)!r}: expected postgres:// or postgresql://"
            )
        self.url, prefix = split_prefix(url, "BROADCAST_URL")
        self.tag = prefix + " "
        # The largest message NOTIFY carries once the tag is in front of it.
        self.max_payload = MAX_PAYLOAD_BYTES - len(self.tag.encode())
        self.pool_size = pool_size
        self.timeout = timeout
        self.keepalive = keepalive
        self._session: _Session | None = None

    async def connect(self) -> None:
        if self._session is not None:
            await self.disconnect()
        listener = await asyncpg.connect(
            self.url,
            timeout=self.timeout,
            server_settings={"application_name": "roomcast-listener"},
        )
        try:
            pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=self.pool_size,
                timeout=self.timeout,
                server_settings={"application_name": "roomcast-publisher"},
            )
        except BaseException:
            listener.terminate()
            raise
        session = _Session(listener, pool, self.tag)
        listener.add_termination_listener(session.on_termination)
        session.keepalive = asyncio.create_task(
            self._keep_alive(session), name="roomcast-postgres-keepalive"
        )
        self._session = session

    async def disconnect(self) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        session.listener.remove_termination_listener(session.on_termination)
        session.lost("disconnected")  # wakes a next_published() still waiting
        if session.keepalive is not None:
            session.keepalive.cancel()
            await asyncio.gather(session.keepalive, return_exceptions=True)
        try:
            await session.listener.close(timeout=self.timeout)
        except Exception as exc:
            log.debug("closing the listening connection: %r", exc)
            session.listener.terminate()
        try:
            async with asyncio.timeout(self.timeout):
                await session.pool.close()
        except Exception as exc:
            log.debug("closing the publishing pool: %r", exc)
            session.pool.terminate()

    def _connected(self) -> _Session:
        if self._session is None:
            raise ConnectionError("the Postgres broadcast backend is not connected")
        return self._session

    async def subscribe(self, channel: str) -> None:
        session = self._connected()
        name = pg_channel(channel)
        async with session.lock, asyncio.timeout(self.timeout):
            await session.listener.add_listener(name, session.on_notification)

    async def unsubscribe(self, channel: str) -> None:
        session = self._connected()
        name = pg_channel(channel)
        async with session.lock, asyncio.timeout(self.timeout):
            await session.listener.remove_listener(name, session.on_notification)

    async def publish(self, channel: str, message: Any) -> None:
        if not isinstance(message, str):
            raise TypeError(f"message must be str, not {type(message).__name__}")
        size = len(message.encode())
        if size > self.max_payload:
            raise ValueError(
                f"envelope of {size} bytes exceeds Postgres NOTIFY's 8000-byte limit "
                f"(at most {self.max_payload} with the prefix): use Redis "
                "(BROADCAST_URL=redis://...) for larger messages"
            )
        session = self._connected()
        name = pg_channel(channel)
        async with session.turns.turn(name):
            await session.pool.execute(
                "SELECT pg_notify($1, $2)", name, self.tag + message, timeout=self.timeout
            )

    async def next_published(self) -> Event:
        session = self._connected()
        item = await session.queue.get()
        if isinstance(item, ConnectionError):
            session.queue.put_nowait(item)  # later calls fail the same way
            raise item
        return item

    async def _keep_alive(self, session: _Session) -> None:
        # A connection whose peer vanished without a FIN or RST (a half-open
        # TCP connection) looks idle forever: ask it something now and then.
        while True:
            stop_if_cancelled()
            await asyncio.sleep(self.keepalive)
            if session.listener.is_closed():
                return  # on_termination has reported it
            try:
                async with session.lock:
                    await session.listener.fetchval("SELECT 1", timeout=self.timeout)
            except Exception as exc:
                session.lost(f"the Postgres listening connection stopped answering: {exc!r}")
                session.listener.terminate()
                return
