"""History in Redis, shared by every worker: one Lua script per operation.

Per room, under one hash tag (so a room's keys share a cluster slot):

- `{prefix}:{room}:meta`  hash: `epoch`, `top`
- `{prefix}:{room}:log`   stream: id `<offset>-0`, fields `d` (data), `t` (ms), `k` (dedupe)
- `{prefix}:{room}:refs`  hash: dedupe key -> offset

The offset is assigned inside the append script, so the envelope cannot be
built with it beforehand. `build` is called once, before the script, with
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

from .history import CALL_TIMEOUT, Appended, Build, Page
from .settings import split_prefix

EPOCH_PLACEHOLDER: Final = "~epoch~"
OFFSET_PLACEHOLDER: Final = 9007199254740993  # 2**53 + 1: no real offset gets there
_MAX_OFFSET: Final = 2**53  # client offsets are unbounded; above any top they mean the same
_EPOCH_FIELD: Final = f'"epoch":"{EPOCH_PLACEHOLDER}"'
_OFFSET_FIELD: Final = re.compile(rf'"offset":({OFFSET_PLACEHOLDER})(?![0-9])')

_LIB = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The room's epoch and top; a room without them has lost its history.
local function open_room(meta, log, refs, fresh)
  local epoch = redis.call('HGET', meta, 'epoch')
  if epoch then return epoch, tonumber(redis.call('HGET', meta, 'top')) end
  redis.call('DEL', log, refs)
  redis.call('HSET', meta, 'epoch', fresh, 'top', 0)
  return fresh, 0
end

local function offset_of(id)
  return tonumber(string.match(id, '^%d+'))
end

-- Drop from the head while more than `size` remain or the head is older than
-- `horizon` (as MemoryStore does); forget the dropped dedupe keys.
local function trim(log, refs, size, horizon)
  local left = redis.call('XLEN', log)
  local start, last, keys = '-', nil, {}
  -- Read no more of the head than needed: the excess, or one entry to test
  -- its age; more once entries are found expired.
  local want = math.max(1, left - size)
  while true do
    local batch = redis.call('XRANGE', log, start, '+', 'COUNT', math.min(want, 100))
    local stop, expired = #batch == 0, false
    for _, e in ipairs(batch) do
      local f = e[2]
      local old = tonumber(f[4]) < horizon
      if left <= size and not old then stop = true; break end
      expired = expired or left <= size
      left = left - 1
      last = e[1]
      if f[6] then keys[#keys + 1] = f[6] end
    end
    if stop then break end
    start = '(' .. batch[#batch][1]
    want = expired and 100 or math.max(1, left - size)
  end
  if last then
    redis.call('XTRIM', log, 'MINID', string.format('%d', offset_of(last) + 1))
    for i = 1, #keys, 1000 do
      redis.call('HDEL', refs, unpack(keys, i, math.min(i + 999, #keys)))
    end
  end
end
"""

# KEYS meta log refs; ARGV size ttl_ms fresh_epoch has_dedupe dedupe piece [marker piece]...
_APPEND = (
    _LIB
    + """
local meta, log, refs = KEYS[1], KEYS[2], KEYS[3]
local size, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = now_ms()
local epoch, top = open_room(meta, log, refs, ARGV[3])
redis.call('PERSIST', meta)
trim(log, refs, size, now - ttl)
local dedupe = ARGV[4] == '1'
if dedupe then
  local seen = redis.call('HGET', refs, ARGV[5])
  if seen then
    local e = redis.call('XRANGE', log, seen, seen)
    if #e > 0 then return {epoch, tonumber(seen), e[1][2][2], 1} end
  end
end
top = redis.call('HINCRBY', meta, 'top', 1)
local id = string.format('%d', top)
local parts = {}
for i = 6, #ARGV do
  local piece = ARGV[i]
  if i % 2 == 1 then
    if piece == 'e' then piece = epoch else piece = id end
  end
  parts[#parts + 1] = piece
end
local data = table.concat(parts)
if dedupe then
  redis.call('XADD', log, id .. '-0', 'd', data, 't', now, 'k', ARGV[5])
  redis.call('HSET', refs, ARGV[5], id)
else
  redis.call('XADD', log, id .. '-0', 'd', data, 't', now)
end
trim(log, refs, size, now - ttl)
return {epoch, top, data, 0}
"""
)

# KEYS meta log refs; ARGV mode(since|last) n size ttl_ms fresh_epoch
# -> {epoch, top, complete, data...}
_READ = (
    _LIB
    + """
local meta, log, refs = KEYS[1], KEYS[2], KEYS[3]
local n, size, ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local since = ARGV[1] == 'since'
local epoch, top = open_room(meta, log, refs, ARGV[5])
if top == 0 then
  -- Keep an empty room's epoch while it is read, without keeping it forever.
  redis.call('PEXPIRE', meta, ttl)
  return {epoch, 0, (not since or n == 0) and 1 or 0}
end
trim(log, refs, size, now_ms() - ttl)
local head = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)
local first = top + 1
if #head > 0 then first = offset_of(head[1][1]) end
local rows
local out = {epoch, top, 1}
if since then
  rows = redis.call('XRANGE', log, string.format('%d', n + 1), '+')
  if first > n + 1 then out[3] = 0 end
  for _, e in ipairs(rows) do out[#out + 1] = e[2][2] end
elseif n > 0 then
  rows = redis.call('XREVRANGE', log, '+', '-', 'COUNT', n)
  for i = #rows, 1, -1 do out[#out + 1] = rows[i][2][2] end
end
return out
"""
)


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
        self._append = client.register_script(_APPEND)
        self._read = client.register_script(_READ)

    async def disconnect(self) -> None:
        if self._redis is not None:
            client, self._redis = self._redis, None
            self._append = self._read = None
            await client.aclose()

    def _keys(self, room: str) -> list[str]:
        # Room names hold no braces, so `{room}` is both injective and a hash tag.
        base = f"{self.prefix}:{{{room}}}"
        return [f"{base}:meta", f"{base}:log", f"{base}:refs"]

    async def append(self, room: str, build: Build, dedupe: str | None = None) -> Appended:
        assert self._append is not None, "RedisStore is not connected"
        pieces = template(build(EPOCH_PLACEHOLDER, OFFSET_PLACEHOLDER))
        args = [self.size, self.ttl_ms, secrets.token_hex(6)]
        args += ["0", ""] if dedupe is None else ["1", dedupe]
        epoch, offset, data, duplicate = await self._append(self._keys(room), args + pieces)
        return Appended(str(epoch), int(offset), str(data), duplicate=bool(duplicate))

    async def _page(self, room: str, mode: str, n: int) -> Page:
        assert self._read is not None, "RedisStore is not connected"
        args = [mode, n, self.size, self.ttl_ms, secrets.token_hex(6)]
        epoch, top, complete, *entries = await self._read(self._keys(room), args)
        return Page(str(epoch), int(top), [str(e) for e in entries], bool(complete))

    async def since(self, room: str, offset: int) -> Page:
        return await self._page(room, "since", min(max(offset, -1), _MAX_OFFSET))

    async def last(self, room: str, count: int) -> Page:
        return await self._page(room, "last", min(max(count, 0), self.size))
