"""The SQL of `PostgresPresence`, for the tables of one `?prefix=`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

SCHEMA_LOCK: Final = 7283349128  # next to the history store's 7283349127


@dataclass(frozen=True)
class Sql:
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


def sql_for(prefix: str) -> Sql:
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
    return Sql(
        schema=f"""
SELECT pg_advisory_xact_lock({SCHEMA_LOCK}); -- workers starting together
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
