"""Presence in PostgreSQL, shared by every worker, with per-worker leases.

The PostgreSQL counterpart of `presence_redis.RedisPresence`, with the same
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
import re
import secrets
from dataclasses import dataclass
from typing import Any, Final

import asyncpg  # type: ignore[import-untyped]

from .envelopes import User
from .presence_lease import LeasedPresence
from .settings import split_prefix

log = logging.getLogger("roomcast.presence")

_SCHEMA_LOCK: Final = 7283349128  # next to history_postgres's 7283349127


# PostgreSQL text holds neither NUL nor lone surrogates: escape them (and the
# escape character), injectively, and undo it when reading.
_ESCAPE: Final = re.compile("[\\\\\x00\ud800-\udfff]")
_UNESCAPE: Final = re.compile(r"\\(\\|0|u[0-9a-f]{4})")


def _escape_one(match: re.Match[str]) -> str:
    c = match.group()
    return "\\\\" if c == "\\" else "\\0" if c == "\x00" else f"\\u{ord(c):04x}"


def _unescape_one(match: re.Match[str]) -> str:
    code = match.group(1)
    return "\\" if code == "\\" else "\x00" if code == "0" else chr(int(code[1:], 16))


def _text(value: str) -> str:
    return _ESCAPE.sub(_escape_one, value)


def _untext(value: str) -> str:
    return _UNESCAPE.sub(_unescape_one, value) if "\\" in value else value


@dataclass(frozen=True)
class _Sql:
    schema: str
    lock: str
    lease: str
    renew: str
    lease_live: str
    restore: str
    add: str
    remove: str
    snapshot: str
    sync: str
    my_rooms: str
    collect_rows: str
    collect_leases: str
    sweep: str
    drop_rows: str
    drop_lease: str
    workers: str


def _sql(prefix: str) -> _Sql:
    w = f'"{prefix}_presence_workers"'
    p = f'"{prefix}_presence"'
    seq = f'"{prefix}_presence_since"'
    now = "statement_timestamp()"
    expiry = f"{now} + $2::float8 * interval '1 second'"

    def live(alias: str) -> str:
        return f"EXISTS (SELECT 1 FROM {w} l WHERE l.worker = {alias}.worker AND l.expires > {now})"

    me_live = (
        f"me AS (SELECT EXISTS (SELECT 1 FROM {w} WHERE worker = $2 AND expires > {now}) AS live)"
    )
    return _Sql(
        schema=f"""
SELECT pg_advisory_xact_lock({_SCHEMA_LOCK}); -- workers starting together
CREATE TABLE IF NOT EXISTS {w} (worker text PRIMARY KEY, expires timestamptz NOT NULL);
CREATE TABLE IF NOT EXISTS {p} (
    room text NOT NULL,
    worker text NOT NULL,
    user_id text NOT NULL,
    name text NOT NULL,
    count integer NOT NULL,
    since bigint NOT NULL,
    PRIMARY KEY (room, worker, user_id)
);
CREATE INDEX IF NOT EXISTS "{prefix}_presence_by_user" ON {p} (room, user_id);
CREATE INDEX IF NOT EXISTS "{prefix}_presence_by_worker" ON {p} (worker);
CREATE SEQUENCE IF NOT EXISTS {seq};
""",
        # $1 room: serializes every worker's decisions about the room.
        lock=f"SELECT pg_advisory_xact_lock(hashtext('{p}'), hashtext($1))",
        # $1 worker, $2 ttl
        lease=f"INSERT INTO {w} (worker, expires) VALUES ($1, {expiry})",
        renew=f"UPDATE {w} SET expires = {expiry} WHERE worker = $1 AND expires > {now} "
        "RETURNING true",
        lease_live=f"SELECT expires > {now} FROM {w} WHERE worker = $1 FOR UPDATE",
        restore=f"INSERT INTO {w} (worker, expires) VALUES ($1, {expiry}) "
        "ON CONFLICT (worker) DO UPDATE SET expires = excluded.expires",
        # $1 room, $2 me, $3 user id, $4 name -> (live, first). Writes only when live.
        add=f"""
WITH {me_live},
held AS (
    SELECT min(p.since) AS since FROM {p} p
    WHERE p.room = $1 AND p.user_id = $3 AND {live("p")}
),
put AS (
    INSERT INTO {p} AS p (room, worker, user_id, name, count, since)
    SELECT $1, $2, $3, $4, 1, coalesce(held.since, nextval('{seq}')) FROM held, me WHERE me.live
    ON CONFLICT (room, worker, user_id)
    DO UPDATE SET count = p.count + 1, name = excluded.name
),
named AS (
    UPDATE {p} p SET name = $4 FROM me
    WHERE me.live AND p.room = $1 AND p.user_id = $3 AND p.worker <> $2 AND p.name <> $4
      AND {live("p")}
)
SELECT me.live, held.since IS NULL AS first FROM me, held
""",
        # $1 room, $2 me, $3 user id -> (live, my count before, held elsewhere).
        remove=f"""
WITH {me_live},
cur AS (SELECT count FROM {p} WHERE room = $1 AND worker = $2 AND user_id = $3),
fewer AS (
    UPDATE {p} SET count = count - 1 FROM me
    WHERE me.live AND room = $1 AND worker = $2 AND user_id = $3 AND count > 1
),
gone AS (
    DELETE FROM {p} USING me
    WHERE me.live AND room = $1 AND worker = $2 AND user_id = $3 AND count <= 1
)
SELECT me.live, (SELECT count FROM cur) AS count,
    EXISTS (SELECT 1 FROM {p} p WHERE p.room = $1 AND p.user_id = $3 AND p.worker <> $2
            AND {live("p")}) AS held
FROM me
""",
        # $1 room, $2 limit -> (online, ids, names)
        snapshot=f"""
WITH u AS (
    SELECT DISTINCT ON (p.user_id) p.user_id, p.name, p.since FROM {p} p
    WHERE p.room = $1 AND {live("p")}
    ORDER BY p.user_id, p.since
)
SELECT (SELECT count(*) FROM u) AS online,
    array(SELECT user_id FROM u ORDER BY since, user_id LIMIT $2) AS ids,
    array(SELECT name FROM u ORDER BY since, user_id LIMIT $2) AS names
""",
        # $1 room, $2 me, $3 ids, $4 names, $5 counts: make my rows of the room exactly
        # these; users new to the room arrive in the given order.
        sync=f"""
WITH want AS (
    SELECT * FROM unnest($3::text[], $4::text[], $5::int[]) WITH ORDINALITY
        AS w(user_id, name, count, ord)
),
gone AS (
    DELETE FROM {p} WHERE room = $1 AND worker = $2 AND user_id <> ALL ($3::text[])
),
held AS (
    SELECT p.user_id, min(p.since) AS since FROM {p} p
    WHERE p.room = $1 AND p.user_id = ANY ($3::text[]) AND {live("p")}
    GROUP BY p.user_id
),
fresh AS (
    SELECT w.user_id, w.name, w.count, coalesce(h.since, nextval('{seq}')) AS since
    FROM want w LEFT JOIN held h USING (user_id)
    ORDER BY w.ord
),
put AS (
    INSERT INTO {p} AS p (room, worker, user_id, name, count, since)
    SELECT $1, $2, user_id, name, count, since FROM fresh
    ON CONFLICT (room, worker, user_id)
    DO UPDATE SET name = excluded.name, count = excluded.count
)
UPDATE {p} p SET name = w.name FROM want w
WHERE p.room = $1 AND p.worker <> $2 AND p.user_id = w.user_id AND p.name <> w.name
  AND {live("p")}
""",
        my_rooms=f"SELECT DISTINCT room FROM {p} WHERE worker = $1",
        # The rows of expired workers; then their leases, once they have no rows.
        collect_rows=f"""
DELETE FROM {p} d USING (
    SELECT p.room, p.worker, p.user_id FROM {p} p JOIN {w} l ON l.worker = p.worker
    WHERE l.expires <= {now}
    FOR UPDATE OF p SKIP LOCKED
) g
WHERE (d.room, d.worker, d.user_id) = (g.room, g.worker, g.user_id)
""",
        collect_leases=f"""
DELETE FROM {w} l
WHERE l.worker IN (SELECT worker FROM {w} WHERE expires <= {now} FOR UPDATE SKIP LOCKED)
  AND NOT EXISTS (SELECT 1 FROM {p} p WHERE p.worker = l.worker)
""",
        # Every row without a live lease (at start-up: a full scan).
        sweep=f"""
DELETE FROM {p} d USING (
    SELECT p.room, p.worker, p.user_id FROM {p} p WHERE NOT {live("p")}
    FOR UPDATE OF p SKIP LOCKED
) g
WHERE (d.room, d.worker, d.user_id) = (g.room, g.worker, g.user_id)
""",
        drop_rows=f"DELETE FROM {p} WHERE worker = $1",
        drop_lease=f"DELETE FROM {w} WHERE worker = $1",
        workers=f"SELECT count(*) FROM {w} WHERE expires > {now}",
    )


class PostgresPresence(LeasedPresence):
    """`PresenceStore` shared by the workers on one PostgreSQL; call `start()` first."""

    def __init__(self, url: str, ttl: float, pool_size: int = 8) -> None:
        self.url, self.prefix = split_prefix(url, "presence URL", 40)
        super().__init__(ttl)
        self.pool_size = pool_size
        self._sql = _sql(self.prefix)
        self._pool: asyncpg.Pool | None = None
        self._restoring = asyncio.Lock()  # one lease restore at a time

    # --- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        if self._pool is not None:
            return
        pool = await asyncpg.create_pool(
            self.url,
            min_size=1,
            max_size=self.pool_size,
            timeout=10.0,
            command_timeout=10.0,
            server_settings={"application_name": "roomcast-presence"},
        )
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
            await asyncio.wait_for(pool.close(), 10.0)
        except Exception:
            pool.terminate()

    # --- the contract ----------------------------------------------------

    async def add(self, room: str, user: User) -> bool:
        pool = self._connected()
        await self._enter()
        try:
            first = await self._add(pool, _text(room), _text(user.id), _text(user.name))
            self._remember(room, user)
        except BaseException:
            self._trouble()  # it may have been committed: the rows may count one too many
            raise
        finally:
            self._leave()
        return first

    async def remove(self, room: str, user: User) -> bool:
        pool = self._pool
        if pool is None:
            return False  # stopped: this worker's entries are withdrawn already
        try:
            await self._enter()
        except BaseException:
            self._forget(room, user.id)  # the connection is gone all the same
            self._trouble()
            raise
        try:
            mine = self._forget(room, user.id)
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(self._sql.lock, _text(room))
                live, count, held = await conn.fetchrow(
                    self._sql.remove, _text(room), self.worker, _text(user.id)
                )
        except BaseException:
            self._trouble()
            raise
        finally:
            self._leave()
        counted = bool(live) and count is not None
        if not live or counted != mine:
            self._trouble()
        return bool(counted and count <= 1 and not held)

    async def snapshot(self, room: str, limit: int) -> tuple[int, list[User]]:
        row = await self._connected().fetchrow(self._sql.snapshot, _text(room), max(0, limit))
        users = [
            User(_untext(i), _untext(n)) for i, n in zip(row["ids"], row["names"], strict=True)
        ]
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
            await self._resync(pool)
        await pool.execute(self._sql.collect_rows)
        await pool.execute(self._sql.collect_leases)

    async def _resync(self, pool: Any) -> None:
        """Rewrite this worker's rows from `_mine`, with add/remove held off."""
        self._gate.clear()
        try:
            await self._idle.wait()
            self._dirty = False
            if await self._restore(pool):
                log.warning("presence lease of worker %s was lost: restoring", self.worker)
            rooms = {_text(room): users for room, users in self._mine.items()}
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
                        [_text(user.id) for user, _ in entries],
                        [_text(user.name) for user, _ in entries],
                        [count for _, count in entries],
                    )
        except BaseException:
            self._dirty = True
            raise
        finally:
            self._gate.set()
