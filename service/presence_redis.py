"""Presence in Redis, shared by every worker, with per-worker leases.

Each worker (one `RedisPresence`, a random 16-hex-digit id `W`) counts its own
connections; a user is in a room while some live worker counts it there. Keys,
all under one hash tag (one cluster slot, so the scripts may touch other
workers' keys), with `B` = `{prefix}:{presence}:`:

- `B lease:W`        string with a `PRESENCE_TTL` expiry, renewed every ttl/3
- `B rooms:W`        set: the rooms where W counts connections
- `B conn:W:R`       hash: user id -> W's connections of that user in room R
- `B workers:R`      set: the workers with a `conn:W:R`
- `B users:R`        sorted set: the room's users, scored by first arrival (µs)
- `B names:R`        hash: user id -> display name
- `B leases`         set: the workers that took a lease (pruned by `workers()`; expires
                     like room keys once no live worker renews it)

(W has a fixed length, so `conn:W:R` names one worker and room; the user id
is only ever a hash field or set member, never part of a key.)

Every operation is one Lua script, so "first" and "last" are decided
atomically across workers. Each script first reaps the room: a worker in
`workers:R` whose lease has expired (a crash, no `stop()`) is dropped with its
connections, and so are its users that no live worker still holds. A crashed
worker's users therefore leave every snapshot within the ttl. The room's keys
also expire (after twice the ttl) unless a live worker renews them, so a crash
leaves nothing behind even in rooms nobody looks at again.

The worker keeps its own counts in memory too (`_mine`, the truth about its
own connections). When its lease was lost (Redis restarted or flushed, the
event loop stalled past the ttl) or a script's outcome is unknown (an error or
a cancellation mid-call), the keep-alive task rewrites this worker's entries
in Redis from that copy ("resync"), with `add`/`remove` held off meanwhile.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable
from typing import Any, Final, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from .envelopes import User
from .presence_lease import LeasedPresence
from .settings import split_prefix

log = logging.getLogger("roomcast.presence")

_TOUCH_BATCH: Final = 100  # rooms renewed per script call
_NAMES_BATCH: Final = 1000  # HMGET arguments per call (Lua's unpack has a limit)

_LIB = """
local base = ARGV[1]

local function conn_key(w, room) return base .. 'conn:' .. w .. ':' .. room end

local function now_us()
  local t = redis.call('TIME')
  return string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2]))
end

-- Whether one of `workers` still counts `uid` in `room`.
local function held(room, workers, uid)
  for _, w in ipairs(workers) do
    if redis.call('HEXISTS', conn_key(w, room), uid) == 1 then return true end
  end
  return false
end

-- Drop from `room` every worker whose lease is gone, and `leaving` when given:
-- their connections, and their users no remaining worker holds. Returns the
-- remaining workers.
local function reap(room, leaving)
  local wkey, ukey, nkey = base .. 'workers:' .. room, base .. 'users:' .. room,
    base .. 'names:' .. room
  local live, gone, unknown = {}, {}, false
  for _, w in ipairs(redis.call('SMEMBERS', wkey)) do
    if w ~= leaving and redis.call('EXISTS', base .. 'lease:' .. w) == 1 then
      live[#live + 1] = w
    else
      local ckey = conn_key(w, room)
      local uids = redis.call('HKEYS', ckey)
      if #uids == 0 then unknown = true end  -- expired already: which users is unknown
      for _, uid in ipairs(uids) do gone[#gone + 1] = uid end
      redis.call('DEL', ckey)
      redis.call('SREM', wkey, w)
      redis.call('SREM', base .. 'rooms:' .. w, room)
    end
  end
  if #live == 0 then
    redis.call('DEL', ukey, nkey)
    return live
  end
  if unknown then gone = redis.call('ZRANGE', ukey, 0, -1) end
  for _, uid in ipairs(gone) do
    if not held(room, live, uid) then
      redis.call('ZREM', ukey, uid)
      redis.call('HDEL', nkey, uid)
    end
  end
  return live
end

-- Renew the expiry of all of the room's keys together.
local function expire_room(room, ttl)
  local wkey = base .. 'workers:' .. room
  for _, w in ipairs(redis.call('SMEMBERS', wkey)) do
    redis.call('PEXPIRE', conn_key(w, room), ttl)
  end
  redis.call('PEXPIRE', wkey, ttl)
  redis.call('PEXPIRE', base .. 'users:' .. room, ttl)
  redis.call('PEXPIRE', base .. 'names:' .. room, ttl)
end
"""

# KEYS lease rooms conn workers users names; ARGV base me room uid name data_ttl
# -> {first, lease_lost}
_ADD = (
    _LIB
    + """
local me, room, uid, ttl = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[6])
local lost = redis.call('EXISTS', KEYS[1]) == 0
reap(room)
redis.call('HINCRBY', KEYS[3], uid, 1)
redis.call('SADD', KEYS[4], me)
redis.call('SADD', KEYS[2], room)
redis.call('PEXPIRE', KEYS[2], ttl)
local first = redis.call('ZADD', KEYS[5], 'NX', now_us(), uid)
redis.call('HSET', KEYS[6], uid, ARGV[5])
expire_room(room, ttl)
return {first, lost and 1 or 0}
"""
)

# KEYS lease rooms conn workers users names; ARGV base me room uid
# -> {counted, last, lease_lost}
_REMOVE = (
    _LIB
    + """
local me, room, uid = ARGV[2], ARGV[3], ARGV[4]
local lost = redis.call('EXISTS', KEYS[1]) == 0
local live = reap(room)
if redis.call('HEXISTS', KEYS[3], uid) == 0 then return {0, 0, lost and 1 or 0} end
local last = 0
if redis.call('HINCRBY', KEYS[3], uid, -1) <= 0 then
  redis.call('HDEL', KEYS[3], uid)
  if redis.call('EXISTS', KEYS[3]) == 0 then
    redis.call('SREM', KEYS[4], me)
    redis.call('SREM', KEYS[2], room)
  end
  if not held(room, live, uid) then
    redis.call('ZREM', KEYS[5], uid)
    redis.call('HDEL', KEYS[6], uid)
    last = 1
  end
end
return {1, last, lost and 1 or 0}
"""
)

# KEYS workers users names; ARGV base room limit batch -> {online, id, name, ...}
_SNAPSHOT = (
    _LIB
    + """
local room, limit, batch = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
reap(room)
local out = {redis.call('ZCARD', KEYS[2])}
if limit > 0 and out[1] > 0 then
  local ids = redis.call('ZRANGE', KEYS[2], 0, limit - 1)
  for i = 1, #ids, batch do
    local names = redis.call('HMGET', KEYS[3], unpack(ids, i, math.min(i + batch - 1, #ids)))
    for j, name in ipairs(names) do
      out[#out + 1] = ids[i + j - 1]
      out[#out + 1] = name or ''
    end
  end
end
return out
"""
)

# KEYS lease rooms; ARGV base me data_ttl room... : reap and keep alive this worker's rooms.
_TOUCH = (
    _LIB
    + """
local ttl = tonumber(ARGV[3])
for i = 4, #ARGV do
  reap(ARGV[i])
  expire_room(ARGV[i], ttl)
end
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
"""
)

# KEYS lease rooms conn workers users names; ARGV base me room data_ttl [id name count]...
# Make this worker's entries in the room exactly the given ones.
_SYNC = (
    _LIB
    + """
local me, room, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4])
reap(room)
local old = redis.call('HKEYS', KEYS[3])
redis.call('DEL', KEYS[3])
local now, keep = now_us(), {}
for i = 5, #ARGV, 3 do
  local uid = ARGV[i]
  keep[uid] = true
  redis.call('HSET', KEYS[3], uid, ARGV[i + 2])
  redis.call('ZADD', KEYS[5], 'NX', now, uid)
  redis.call('HSET', KEYS[6], uid, ARGV[i + 1])
end
if #ARGV >= 5 then
  redis.call('SADD', KEYS[4], me)
  redis.call('SADD', KEYS[2], room)
  redis.call('PEXPIRE', KEYS[2], ttl)
else
  redis.call('SREM', KEYS[4], me)
  redis.call('SREM', KEYS[2], room)
end
local live = redis.call('SMEMBERS', KEYS[4])
for _, uid in ipairs(old) do
  if not keep[uid] and not held(room, live, uid) then
    redis.call('ZREM', KEYS[5], uid)
    redis.call('HDEL', KEYS[6], uid)
  end
end
if #live == 0 then redis.call('DEL', KEYS[5], KEYS[6]) end
expire_room(room, ttl)
return 1
"""
)

# KEYS leases; ARGV base: the workers whose lease is alive (the others are pruned).
_WORKERS = """
local live = 0
for _, w in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. 'lease:' .. w) == 1 then
    live = live + 1
  else
    redis.call('SREM', KEYS[1], w)
  end
end
return live
"""

# KEYS lease rooms; ARGV base me: withdraw this worker from every room.
_DROP = (
    _LIB
    + """
local me = ARGV[2]
for _, room in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  reap(room, me)
  redis.call('DEL', conn_key(me, room))
end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""
)


class RedisPresence(LeasedPresence):
    """`PresenceStore` shared by the workers on one Redis; call `start()` first."""

    def __init__(self, url: str, ttl: float) -> None:
        self.url, self.prefix = split_prefix(url, "presence URL")
        super().__init__(ttl)
        self.ttl_ms = max(1, round(ttl * 1000))
        self.data_ttl_ms = 2 * self.ttl_ms  # outlives a lease long enough to be reaped
        self._base = f"{self.prefix}:{{presence}}:"
        self._redis: aioredis.Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}

    # --- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        if self._redis is not None:
            return
        client = aioredis.Redis.from_url(
            self.url,
            decode_responses=True,
            encoding_errors="surrogatepass",  # any Python str round-trips
            socket_connect_timeout=10.0,
            socket_timeout=10.0,
            retry=Retry(NoBackoff(), 0),  # a retried script could count twice
        )
        worker = secrets.token_hex(8)
        try:
            await cast(Awaitable[bool], client.ping())
            await client.set(self._base + "lease:" + worker, "1", px=self.ttl_ms, nx=True)
        except BaseException:
            await client.aclose()
            raise
        self._redis, self.worker = client, worker
        try:
            await self._enlist(client)
        except BaseException:
            self._redis = None
            await client.aclose()
            raise
        self._scripts = {
            name: client.register_script(text)
            for name, text in (
                ("add", _ADD),
                ("remove", _REMOVE),
                ("snapshot", _SNAPSHOT),
                ("touch", _TOUCH),
                ("sync", _SYNC),
                ("drop", _DROP),
                ("workers", _WORKERS),
            )
        }
        self._start_keep_alive()

    def _detach(self) -> aioredis.Redis | None:
        client, self._redis = self._redis, None
        return client

    async def _withdraw(self, client: aioredis.Redis) -> None:
        await self._scripts["drop"](keys=self._worker_keys(), args=[self._base, self.worker])
        await cast(Awaitable[int], client.srem(self._base + "leases", self.worker))

    async def _disconnect(self, client: aioredis.Redis) -> None:
        self._scripts = {}
        await client.aclose()

    # --- the contract ----------------------------------------------------

    async def add(self, room: str, user: User) -> bool:
        script = self._script("add")
        await self._enter()
        try:
            first, lost = await script(
                keys=self._keys(room),
                args=[self._base, self.worker, room, user.id, user.name, self.data_ttl_ms],
            )
            self._remember(room, user)
        except BaseException:
            self._trouble()  # the script may have run: Redis may count one too many
            raise
        finally:
            self._leave()
        if lost:
            self._trouble()
        return bool(first)

    async def remove(self, room: str, user: User) -> bool:
        if not self._scripts:
            return False  # stopped: this worker's entries are withdrawn already
        script = self._script("remove")
        try:
            await self._enter()
        except BaseException:
            self._forget(room, user.id)  # the connection is gone all the same
            self._trouble()
            raise
        try:
            mine = self._forget(room, user.id)
            counted, last, lost = await script(
                keys=self._keys(room), args=[self._base, self.worker, room, user.id]
            )
        except BaseException:
            self._trouble()
            raise
        finally:
            self._leave()
        if lost or bool(counted) != mine:
            self._trouble()
        return bool(last)

    async def snapshot(self, room: str, limit: int) -> tuple[int, list[User]]:
        base = self._base
        online, *flat = await self._script("snapshot")(
            keys=[base + "workers:" + room, base + "users:" + room, base + "names:" + room],
            args=[base, room, max(0, limit), _NAMES_BATCH],
        )
        users = [User(str(flat[i]), str(flat[i + 1])) for i in range(0, len(flat), 2)]
        return int(online), users

    async def workers(self) -> int:
        return int(await self._script("workers")(keys=[self._base + "leases"], args=[self._base]))

    # --- internals -------------------------------------------------------

    def _script(self, name: str) -> AsyncScript:
        script = self._scripts.get(name)
        if script is None:
            raise ConnectionError("Redis presence is not started (or already stopped)")
        return script

    def _worker_keys(self) -> list[str]:
        return [self._base + "lease:" + self.worker, self._base + "rooms:" + self.worker]

    def _keys(self, room: str) -> list[str]:
        base = self._base
        return [
            *self._worker_keys(),
            f"{base}conn:{self.worker}:{room}",
            base + "workers:" + room,
            base + "users:" + room,
            base + "names:" + room,
        ]

    async def _refresh(self) -> None:
        client = self._redis
        assert client is not None
        renewed = await client.set(self._worker_keys()[0], "1", px=self.ttl_ms, xx=True)
        await self._enlist(client)
        if not renewed or self._dirty:
            if not renewed:
                log.warning("presence lease of worker %s was lost: restoring", self.worker)
            await self._resync(client)
        rooms = list(self._mine)
        for i in range(0, max(len(rooms), 1), _TOUCH_BATCH):
            await self._script("touch")(
                keys=self._worker_keys(),
                args=[self._base, self.worker, self.data_ttl_ms, *rooms[i : i + _TOUCH_BATCH]],
            )

    async def _enlist(self, client: aioredis.Redis) -> None:
        """List this worker in `leases`, which outlives the last live worker by data_ttl."""
        async with client.pipeline(transaction=False) as pipe:
            pipe.sadd(self._base + "leases", self.worker)
            pipe.pexpire(self._base + "leases", self.data_ttl_ms)
            await pipe.execute()

    async def _resync(self, client: aioredis.Redis) -> None:
        """Rewrite this worker's entries from `_mine`, with add/remove held off."""
        self._gate.clear()
        try:
            await self._idle.wait()
            self._dirty = False
            lease, rooms_key = self._worker_keys()
            await client.set(lease, "1", px=self.ttl_ms)
            listed = await cast(Awaitable[set[str]], client.smembers(rooms_key))
            for room in sorted(set(self._mine) | listed):
                args: list[Any] = [self._base, self.worker, room, self.data_ttl_ms]
                for user, count in self._mine.get(room, {}).values():
                    args += [user.id, user.name, count]
                await self._script("sync")(keys=self._keys(room), args=args)
        except BaseException:
            self._dirty = True
            raise
        finally:
            self._gate.set()
