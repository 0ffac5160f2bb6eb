"""History in PostgreSQL, shared by every worker (asyncpg pool).

An append is one transaction that starts by bumping the room's `top`: that
row lock serializes the room's appenders until commit, so offsets have no
gaps and a reader never sees offset n+1 committed before n. A duplicate rolls
the bump back. Timestamps are the database's clock, the same for every
worker. The epoch is a row of `roomcast_meta`, created with the tables: new
tables (history lost) mean a new epoch. With `?prefix=p` the tables are
`p_meta`, `p_rooms` and `p_messages` (the default prefix is `roomcast`).
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Final

from ..pg import create_pool, text
from ..urls import split_prefix
from .base import Appended, Build, Page

_MAX_OFFSET: Final = 2**53  # client offsets are unbounded; above any top they mean the same

_SCHEMA: Final = """
SELECT pg_advisory_xact_lock(7283349127); -- workers starting together
CREATE TABLE IF NOT EXISTS roomcast_meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS roomcast_rooms (room text PRIMARY KEY, top bigint NOT NULL);
CREATE TABLE IF NOT EXISTS roomcast_messages (
    room text NOT NULL,
    "offset" bigint NOT NULL,
    ts timestamptz NOT NULL,
    data text NOT NULL,
    dedupe text,
    PRIMARY KEY (room, "offset"),
    UNIQUE (room, dedupe)
);
"""

# The oldest retained offset of room $1 whose top is {top} (top + 1 if none):
# the last $2 messages, from the first one younger than $3 seconds on (the head
# is trimmed, as MemoryStore does).
_FIRST: Final = """coalesce(
    (SELECT min("offset") FROM roomcast_messages
     WHERE room = $1 AND "offset" > {top} - $2::bigint
       AND ts >= statement_timestamp() - $3::float8 * interval '1 second'),
    {top} + 1)"""

# $1 room, $2 size, $3 ttl, $4 top
_TRIM: Final = f"""
DELETE FROM roomcast_messages WHERE room = $1 AND "offset" < {_FIRST.format(top="$4::bigint")}
"""

# $1 room, $2 size, $3 ttl, $4 after, $5 count. One statement, one snapshot:
# top, the first retained offset, and the retained entries above $4 and among
# the last $5.
_READ: Final = f"""
WITH r AS (SELECT coalesce((SELECT top FROM roomcast_rooms WHERE room = $1), 0) AS top),
     f AS (SELECT r.top, {_FIRST.format(top="r.top")} AS first FROM r)
SELECT f.top, f.first, array(
    SELECT data FROM roomcast_messages
    WHERE room = $1 AND "offset" >= f.first AND "offset" > $4::bigint
      AND "offset" > f.top - $5::bigint
    ORDER BY "offset"
) AS entries
FROM f
"""

_BUMP: Final = """INSERT INTO roomcast_rooms AS r (room, top) VALUES ($1, 1)
ON CONFLICT (room) DO UPDATE SET top = r.top + 1 RETURNING top"""
_SEEN: Final = 'SELECT "offset", data FROM roomcast_messages WHERE room = $1 AND dedupe = $2'
_INSERT: Final = """INSERT INTO roomcast_messages (room, "offset", ts, data, dedupe)
VALUES ($1, $2, statement_timestamp(), $3, $4)"""
_DROP_OLD: Final = 'DELETE FROM roomcast_messages WHERE room = $1 AND "offset" <= $2'
_EPOCH_NEW: Final = (
    "INSERT INTO roomcast_meta (key, value) VALUES ('epoch', $1) ON CONFLICT DO NOTHING"
)
_EPOCH: Final = "SELECT value FROM roomcast_meta WHERE key = 'epoch'"


_TABLE: Final = re.compile(r"\broomcast_(meta|rooms|messages)\b")


def _named(sql: str, prefix: str) -> str:
    """`sql` with each `roomcast_<table>` as the (quoted) table of `prefix`."""
    return _TABLE.sub(lambda m: f'"{prefix}_{m.group(1)}"', sql)


class PostgresStore:
    def __init__(self, url: str, size: int, ttl: float, pool_size: int = 10) -> None:
        # 40: the longest prefix whose table names fit Postgres' 63 bytes (as presence's).
        self.url, prefix = split_prefix(url, "HISTORY_URL", 40)
        self._sql = {
            name: _named(sql, prefix)
            for name, sql in (
                ("schema", _SCHEMA),
                ("trim", _TRIM),
                ("read", _READ),
                ("bump", _BUMP),
                ("seen", _SEEN),
                ("insert", _INSERT),
                ("drop_old", _DROP_OLD),
                ("epoch_new", _EPOCH_NEW),
                ("epoch", _EPOCH),
            )
        }
        self.size = size
        self.ttl = ttl
        self.pool_size = pool_size
        self.epoch = ""
        self._pool: Any = None

    async def connect(self) -> None:
        if self._pool is not None:
            return
        pool = await create_pool(self.url, "roomcast-history", self.pool_size)
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(self._sql["schema"])
                await conn.execute(self._sql["epoch_new"], secrets.token_hex(6))
                self.epoch = await conn.fetchval(self._sql["epoch"])
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def disconnect(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def ping(self) -> None:
        await self._connected().fetchval("SELECT 1")

    def _connected(self) -> Any:
        if self._pool is None:
            raise ConnectionError("the Postgres history store is not connected")
        return self._pool

    async def append(self, room: str, build: Build, dedupe: str | None = None) -> Appended:
        async with self._connected().acquire() as conn:
            try:
                async with conn.transaction():
                    return await self._append(conn, room, build, dedupe)
            except _Duplicate as dup:  # leaving by an exception rolled the bump back
                return dup.appended

    async def _append(self, conn: Any, room: str, build: Build, dedupe: str | None) -> Appended:
        top: int = await conn.fetchval(self._sql["bump"], room)
        # Trim as of the previous top first, so a duplicate finds what is retained.
        await conn.execute(self._sql["trim"], room, self.size, self.ttl, top - 1)
        key = None if dedupe is None else text(dedupe)
        if key is not None:
            seen = await conn.fetchrow(self._sql["seen"], room, key)
            if seen is not None:
                raise _Duplicate(Appended(self.epoch, seen[0], seen[1], duplicate=True))
        data = build(self.epoch, top)
        await conn.execute(self._sql["insert"], room, top, data, key)
        if top > self.size:
            await conn.execute(self._sql["drop_old"], room, top - self.size)
        return Appended(self.epoch, top, data, duplicate=False)

    async def _read(self, room: str, after: int, count: int) -> tuple[int, int, list[str]]:
        row = await self._connected().fetchrow(
            self._sql["read"], room, self.size, self.ttl, after, count
        )
        return int(row["top"]), int(row["first"]), [str(e) for e in row["entries"]]

    async def since(self, room: str, offset: int) -> Page:
        offset = min(max(offset, -1), _MAX_OFFSET)
        top, first, entries = await self._read(room, offset, self.size)
        if top == 0:
            return Page(self.epoch, 0, [], complete=offset == 0)
        return Page(self.epoch, top, entries, complete=first <= offset + 1)

    async def last(self, room: str, count: int) -> Page:
        top, _, entries = await self._read(room, 0, min(max(count, 0), self.size))
        return Page(self.epoch, top, entries)


class _Duplicate(Exception):
    def __init__(self, appended: Appended) -> None:
        self.appended = appended
