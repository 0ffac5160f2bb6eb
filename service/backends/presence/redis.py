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

from ...protocol.envelopes import User
from ..lua import script
from ..urls import split_prefix
from .leased import LeasedPresence

log = logging.getLogger("roomcast.presence")

_TOUCH_BATCH: Final = 100  # rooms renewed per script call
_NAMES_BATCH: Final = 1000  # HMGET arguments per call (Lua's unpack has a limit)


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
            name: client.register_script(script(__name__, "redis_lib", f"redis_{name}"))
            for name in ("add", "remove", "snapshot", "touch", "sync", "drop")
        }
        self._scripts["workers"] = client.register_script(script(__name__, "redis_workers"))
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

    def _started(self) -> bool:
        return bool(self._scripts)

    async def _store_add(self, room: str, user: User) -> tuple[bool, bool]:
        first, lost = await self._script("add")(
            keys=self._keys(room),
            args=[self._base, self.worker, room, user.id, user.name, self.data_ttl_ms],
        )
        return bool(first), bool(lost)

    async def _store_remove(self, room: str, user: User) -> tuple[bool, bool, bool]:
        counted, last, lost = await self._script("remove")(
            keys=self._keys(room), args=[self._base, self.worker, room, user.id]
        )
        return bool(counted), bool(last), bool(lost)

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
        if client is None:
            raise ConnectionError("Redis presence is not started (or already stopped)")
        renewed = await client.set(self._worker_keys()[0], "1", px=self.ttl_ms, xx=True)
        await self._enlist(client)
        if not renewed or self._dirty:
            if not renewed:
                log.warning("presence lease of worker %s was lost: restoring", self.worker)
            await self._resync()
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

    async def _rewrite(self) -> None:
        client = self._redis
        if client is None:
            raise ConnectionError("Redis presence is not started (or already stopped)")
        lease, rooms_key = self._worker_keys()
        await client.set(lease, "1", px=self.ttl_ms)
        listed = await cast(Awaitable[set[str]], client.smembers(rooms_key))
        for room in sorted(set(self._mine) | listed):
            args: list[Any] = [self._base, self.worker, room, self.data_ttl_ms]
            for user, count in self._mine.get(room, {}).values():
                args += [user.id, user.name, count]
            await self._script("sync")(keys=self._keys(room), args=args)
