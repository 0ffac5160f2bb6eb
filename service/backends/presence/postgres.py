"""Presence in PostgreSQL, shared by every worker, with per-worker leases.

The SQL is in `postgres_sql.py`. The PostgreSQL counterpart of `redis.RedisPresence`, with the same
semantics. Each worker (one `PostgresPresence`, a random 16-hex-digit id)
counts its own connections; a user is in a room while some live worker counts
it there. Two tables and a sequence, named after `?prefix=` (default
`roomcast`, stripped from the URL before asyncpg sees it):

- `{prefix}_presence_workers (worker, expires)`: one lease per worker,
  `expires` on the server's clock, renewed every ttl/3;
- `{prefix}_presence (room, worker, user_id, name, count, since)`: a worker's
  connections of a user in a room, primary key (room, worker, user_id);
- `{prefix}_presence_since`: the sequence that orders first arrivals.

A row counts only while its worker's lease has not expired: every query joins
the leases (`statement_timestamp()`), so a crashed worker's users leave every
snapshot within the ttl. Rows of expired workers are deleted lazily by every
live worker's keep-alive, expired leases with them, and at start-up any row
without a live lease; those deletions skip locked rows (`SKIP LOCKED`), so
they never wait and never deadlock. The rows of a user in a room all carry
its first arrival (`since`, copied from the live rows already there) and its
latest name (an add renames the other live rows), so the listing is in
first-arrival order and shows the latest name, as with Redis.

`add` and `remove` decide "first" and "last" in one transaction that begins
with `pg_advisory_xact_lock` on the room: the decisions of all workers about
a room are serialized, and each reads what the previous ones committed.

The worker keeps its own counts in memory too (`_mine`). When its lease was
lost (the loop stalled past the ttl, the rows were deleted, the tables were
dropped) or an outcome is unknown (an error or a cancellation mid-call), the
keep-alive task rewrites this worker's rows from that copy ("resync"), with
`add`/`remove` held off meanwhile. Restoring a lost lease first deletes every
row of the worker (they were invisible already) in the same transaction that
takes the lease back, so no stale row ever comes back to life. An `add` that
finds its lease lost restores it at once and then counts its connection
(which is listed before the connections restored later, as with Redis).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

import asyncpg

from ...protocol.envelopes import User
from ..pg import create_pool, text, untext
from ..urls import split_prefix
from .leased import LeasedPresence
from .postgres_sql import sql_for

log = logging.getLogger("roomcast.presence")


class PostgresPresence(LeasedPresence):
    """`PresenceStore` shared by the workers on one PostgreSQL; call `start()` first."""

    def __init__(self, url: str, ttl: float, pool_size: int = 8) -> None:
        self.url, self.prefix = split_prefix(url, "presence URL", 40)
        super().__init__(ttl)
        self.pool_size = pool_size
        self._sql = sql_for(self.prefix)
        self._pool: Any = None
        self._restoring = asyncio.Lock()  # one lease restore at a time

    # --- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        if self._pool is not None:
            return
        pool = await create_pool(self.url, "roomcast-presence", self.pool_size)
        worker = secrets.token_hex(8)
        try:
            await self._create(pool)
            await pool.execute(self._sql.lease, worker, self.ttl)
            await pool.execute(self._sql.sweep)  # what crashed workers left behind
        except BaseException:
            pool.terminate()
            raise
        self._pool, self.worker = pool, worker
        self._start_keep_alive()

    def _detach(self) -> Any:
        pool, self._pool = self._pool, None
        return pool

    async def _withdraw(self, pool: Any) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(self._sql.drop_rows, self.worker)
            await conn.execute(self._sql.drop_lease, self.worker)

    async def _disconnect(self, pool: Any) -> None:
        try:
            async with asyncio.timeout(10.0):
                await pool.close()
        except Exception:
            pool.terminate()

    # --- the contract ----------------------------------------------------

    def _started(self) -> bool:
        return self._pool is not None

    async def _store_add(self, room: str, user: User) -> tuple[bool, bool]:
        pool = self._connected()
        return await self._add(pool, text(room), text(user.id), text(user.name)), False

    async def _store_remove(self, room: str, user: User) -> tuple[bool, bool, bool]:
        async with self._connected().acquire() as conn, conn.transaction():
            await conn.execute(self._sql.lock, text(room))
            live, count, held = await conn.fetchrow(
                self._sql.remove, text(room), self.worker, text(user.id)
            )
        counted = bool(live) and count is not None
        return counted, bool(counted and count <= 1 and not held), not live

    async def snapshot(self, room: str, limit: int) -> tuple[int, list[User]]:
        row = await self._connected().fetchrow(self._sql.snapshot, text(room), max(0, limit))
        users = [User(untext(i), untext(n)) for i, n in zip(row["ids"], row["names"], strict=True)]
        return int(row["online"]), users

    async def workers(self) -> int:
        return int(await self._connected().fetchval(self._sql.workers))

    # --- internals -------------------------------------------------------

    def _connected(self) -> Any:
        if self._pool is None:
            raise ConnectionError("Postgres presence is not started (or already stopped)")
        return self._pool

    async def _create(self, pool: Any) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(self._sql.schema)

    async def _add(self, pool: Any, room: str, uid: str, name: str) -> bool:
        for attempt in range(2):
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(self._sql.lock, room)
                live, first = await conn.fetchrow(self._sql.add, room, self.worker, uid, name)
            if live:
                return bool(first)
            # The lease was lost, and nothing was written: take it back now (this
            # connection is then listed before those the resync restores), retry.
            self._trouble()
            if not attempt:
                await self._restore(pool)
        return bool(first)  # lost again at once: counted in `_mine`, the resync writes it

    async def _restore(self, pool: Any) -> bool:
        """Renew the lease or, when it was lost, take it back, deleting in the same
        transaction the rows it no longer covered (so none comes back to life).
        Whether it was lost."""
        async with self._restoring, pool.acquire() as conn, conn.transaction():
            live = await conn.fetchval(self._sql.lease_live, self.worker)
            if not live:
                await conn.execute(self._sql.drop_rows, self.worker)
            await conn.execute(self._sql.restore, self.worker, self.ttl)
        return not live

    async def _refresh(self) -> None:
        pool = self._connected()
        try:
            renewed = await pool.fetchval(self._sql.renew, self.worker, self.ttl)
        except asyncpg.UndefinedTableError:  # the tables were dropped: make them again
            await self._create(pool)
            renewed = False
        if not renewed or self._dirty:
            await self._resync()
        await pool.execute(self._sql.collect_rows)
        await pool.execute(self._sql.collect_leases)

    async def _rewrite(self) -> None:
        pool = self._connected()
        if await self._restore(pool):
            log.warning("presence lease of worker %s was lost: restoring", self.worker)
        rooms = {text(room): users for room, users in self._mine.items()}
        for row in await pool.fetch(self._sql.my_rooms, self.worker):
            rooms.setdefault(row["room"], {})
        for room in sorted(rooms):
            entries = list(rooms[room].values())
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(self._sql.lock, room)
                await conn.execute(
                    self._sql.sync,
                    room,
                    self.worker,
                    [text(user.id) for user, _ in entries],
                    [text(user.name) for user, _ in entries],
                    [count for _, count in entries],
                )
