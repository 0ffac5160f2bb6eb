"""History in Redis, shared by every worker: one Lua script per operation.

Per room, under one hash tag (so a room's keys share a cluster slot):

- `{prefix}:{room}:meta`  hash: `epoch`, `top`
- `{prefix}:{room}:log`   stream: id `<offset>-0`, fields `d` (data), `t` (ms), `k` (dedupe)
- `{prefix}:{room}:refs`  hash: dedupe key -> offset

The scripts are the `redis_*.lua` files beside this module. The offset is
assigned inside the append script, so the envelope cannot be built with it
beforehand. `build` is called once, before the script, with
placeholders; the script splices the room's epoch and the new offset into the
text where the placeholders were. The envelope must be compact JSON whose own
`"epoch":"…"` and `"offset":…` fields come before any user-controlled JSON (true
of msgspec-encoded `Chat` and `Notification`): inside a JSON string a `"` is
escaped, so user text never holds the field text itself. The placeholders are
found here, in Python, and the script only concatenates.

The epoch is per room and kept in its meta hash: a flushed or evicted room
gets a new random epoch (sent along in every call) and starts again at 1.
Timestamps are the Redis server's clock, the same for every worker.
Needs Redis 6.2+ (`XTRIM MINID`, exclusive ranges).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Awaitable
from typing import Any, Final, cast

import redis.asyncio as aioredis

from ..lua import script
from ..urls import split_prefix
from .base import CALL_TIMEOUT, Appended, Build, Page

EPOCH_PLACEHOLDER: Final = "~epoch~"
OFFSET_PLACEHOLDER: Final = 9007199254740993  # 2**53 + 1: no real offset gets there
_MAX_OFFSET: Final = 2**53  # client offsets are unbounded; above any top they mean the same
_EPOCH_FIELD: Final = f'"epoch":"{EPOCH_PLACEHOLDER}"'
_OFFSET_FIELD: Final = re.compile(rf'"offset":({OFFSET_PLACEHOLDER})(?![0-9])')


def template(text: str) -> list[str]:
    """`text` built with the placeholders, cut around them: piece, marker, piece…
    with marker `e` (epoch) or `o` (offset) where the script puts the real value."""
    cuts: list[tuple[int, int, str]] = []
    at = text.find(_EPOCH_FIELD)
    if at >= 0:
        start = at + len('"epoch":"')
        cuts.append((start, start + len(EPOCH_PLACEHOLDER), "e"))
    match = _OFFSET_FIELD.search(text)
    if match:
        cuts.append((match.start(1), match.end(1), "o"))
    if len(cuts) < 2 and (
        (at < 0 and EPOCH_PLACEHOLDER in text) or (not match and str(OFFSET_PLACEHOLDER) in text)
    ):
        raise ValueError(
            "RedisStore: build() must encode compact JSON with the epoch and offset as "
            f'"epoch":"…" and "offset":… fields; got {text[:200]!r}'
        )
    pieces: list[str] = []
    pos = 0
    for start, end, marker in sorted(cuts):
        pieces += [text[pos:start], marker]
        pos = end
    pieces.append(text[pos:])
    return pieces


class RedisStore:
    def __init__(self, url: str, size: int, ttl: float) -> None:
        self.url, self.prefix = split_prefix(url, "HISTORY_URL")
        self.size = size
        self.ttl_ms = max(1, round(ttl * 1000))
        self._redis: aioredis.Redis | None = None
        self._append: Any = None
        self._read: Any = None

    async def connect(self) -> None:
        if self._redis is not None:
            return
        client = aioredis.Redis.from_url(
            self.url,
            decode_responses=True,
            socket_connect_timeout=CALL_TIMEOUT,
            # A Redis that stops answering fails the call (the client gets an
            # error and retries with its ref) instead of stalling it for good.
            socket_timeout=CALL_TIMEOUT,
        )
        try:
            await cast(Awaitable[bool], client.ping())
        except BaseException:
            await client.aclose()
            raise
        self._redis = client
        self._append = client.register_script(script(__name__, "redis_lib", "redis_append"))
        self._read = client.register_script(script(__name__, "redis_lib", "redis_read"))

    async def disconnect(self) -> None:
        if self._redis is not None:
            client, self._redis = self._redis, None
            self._append = self._read = None
            await client.aclose()

    async def ping(self) -> None:
        if self._redis is None:
            raise ConnectionError("the Redis history store is not connected")
        await cast(Awaitable[bool], self._redis.ping())

    def _keys(self, room: str) -> list[str]:
        # Room names hold no braces, so `{room}` is both injective and a hash tag.
        base = f"{self.prefix}:{{{room}}}"
        return [f"{base}:meta", f"{base}:log", f"{base}:refs"]

    async def append(self, room: str, build: Build, dedupe: str | None = None) -> Appended:
        if self._append is None:
            raise ConnectionError("the Redis history store is not connected")
        pieces = template(build(EPOCH_PLACEHOLDER, OFFSET_PLACEHOLDER))
        args = [self.size, self.ttl_ms, secrets.token_hex(6)]
        args += ["0", ""] if dedupe is None else ["1", dedupe]
        epoch, offset, data, duplicate = await self._append(self._keys(room), args + pieces)
        return Appended(str(epoch), int(offset), str(data), duplicate=bool(duplicate))

    async def _page(self, room: str, mode: str, n: int) -> Page:
        if self._read is None:
            raise ConnectionError("the Redis history store is not connected")
        args = [mode, n, self.size, self.ttl_ms, secrets.token_hex(6)]
        epoch, top, complete, *entries = await self._read(self._keys(room), args)
        return Page(str(epoch), int(top), [str(e) for e in entries], bool(complete))

    async def since(self, room: str, offset: int) -> Page:
        return await self._page(room, "since", min(max(offset, -1), _MAX_OFFSET))

    async def last(self, room: str, count: int) -> Page:
        return await self._page(room, "last", min(max(count, 0), self.size))
