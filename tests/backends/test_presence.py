"""Presence: the contract of every `PresenceStore`, and Redis and PostgreSQL across workers.

The Redis tests run on a real redis-server, each under a prefix of its own;
several `RedisPresence` objects on one Redis stand for several workers. The
PostgreSQL tests likewise run on a real server, each with tables of its own
(`?prefix=`), several `PostgresPresence` objects standing for several workers.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as aioredis

from roomcast.backends.presence import redis as presence_redis
from roomcast.backends.presence.base import PresenceStore
from roomcast.backends.presence.factory import open_presence
from roomcast.backends.presence.local import LocalPresence
from roomcast.backends.presence.postgres import PostgresPresence
from roomcast.backends.presence.redis import RedisPresence
from roomcast.protocol.envelopes import User
from roomcast.settings import Settings, SettingsError

from ..brokers import start_postgres
from ..waiting import eventually, within

ADA, BOB, CAROL = User("u-ada", "Ada"), User("u-bob", "Bob"), User("u-carol", "Carol")


class Workers:
    """RedisPresence objects on one Redis and one prefix, as workers would be."""

    def __init__(self, url: str) -> None:
        self.prefix = f"t{secrets.token_hex(4)}"
        self.url = f"{url}?prefix={self.prefix}"
        self.raw = aioredis.Redis.from_url(url, decode_responses=True)
        self.started: list[RedisPresence] = []

    async def open(self, ttl: float = 30.0) -> RedisPresence:
        presence = RedisPresence(self.url, ttl)
        await within(presence.start())
        self.started.append(presence)
        return presence

    async def keys(self) -> set[str]:
        async def scan() -> set[str]:
            return {key async for key in self.raw.scan_iter(match=self.prefix + ":*", count=1000)}

        return await within(scan())

    async def close(self) -> None:
        for presence in self.started:
            await within(presence.stop())
        await within(self.raw.aclose())


@pytest.fixture
async def workers(redis_url: str) -> AsyncIterator[Workers]:
    w = Workers(redis_url)
    yield w
    await w.close()


class PgWorkers:
    """PostgresPresence objects on one PostgreSQL and one table prefix, as workers would be."""

    def __init__(self, url: str) -> None:
        self.prefix = f"t{secrets.token_hex(4)}"
        self.server_url = url
        self.url = f"{url}?prefix={self.prefix}"
        self.started: list[PostgresPresence] = []
        self._raw: asyncpg.Connection | None = None

    async def open(self, ttl: float = 30.0) -> PostgresPresence:
        presence = PostgresPresence(self.url, ttl)
        await within(presence.start())
        self.started.append(presence)
        return presence

    async def sql(self, query: str, *args: object) -> list[asyncpg.Record]:
        """Run `query` on a connection of its own; `{p}` is the table name prefix."""
        if self._raw is None:
            self._raw = await within(asyncpg.connect(self.server_url))
        return await within(self._raw.fetch(query.replace("{p}", self.prefix), *args))

    async def rows(self) -> set[tuple[str, str, str]]:
        found = await self.sql('SELECT room, worker, user_id FROM "{p}_presence"')
        return {(r["room"], r["worker"], r["user_id"]) for r in found}

    async def leases(self) -> set[str]:
        return {r["worker"] for r in await self.sql('SELECT worker FROM "{p}_presence_workers"')}

    async def close(self) -> None:
        for presence in self.started:
            await within(presence.stop())
        if self._raw is not None:
            await within(self._raw.close())


@pytest.fixture
async def pg_workers(postgres_url: str) -> AsyncIterator[PgWorkers]:
    w = PgWorkers(postgres_url)
    yield w
    await w.close()


@pytest.fixture(params=["local", "redis", "postgres"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[PresenceStore]:
    if request.param == "local":
        local: PresenceStore = LocalPresence()
        await within(local.start())
        yield local
        await within(local.stop())
    elif request.param == "redis":
        w = Workers(request.getfixturevalue("redis_url"))
        try:
            yield await w.open()
        finally:
            await w.close()
    else:
        pg = PgWorkers(request.getfixturevalue("postgres_url"))
        try:
            yield await pg.open()
        finally:
            await pg.close()


async def crash(presence: RedisPresence) -> None:
    """End a worker as a crash would: no more renewals, nothing withdrawn."""
    task, presence._task = presence._task, None
    assert task is not None
    task.cancel()
    await within(asyncio.gather(task, return_exceptions=True))
    client, presence._redis = presence._redis, None
    presence._scripts = {}
    assert client is not None
    await within(client.aclose())


def ids(users: list[User]) -> list[str]:
    return [u.id for u in users]


# --- the contract --------------------------------------------------------------


async def test_first_and_last_connection(store: PresenceStore) -> None:
    assert await within(store.add("r", ADA)) is True
    assert await within(store.add("r", ADA)) is False
    assert await within(store.snapshot("r", 10)) == (1, [ADA])
    assert await within(store.remove("r", ADA)) is False
    assert await within(store.snapshot("r", 10)) == (1, [ADA])
    assert await within(store.remove("r", ADA)) is True
    assert await within(store.snapshot("r", 10)) == (0, [])
    assert await within(store.add("r", ADA)) is True  # back again: first again


async def test_distinct_users_counted_per_connection(store: PresenceStore) -> None:
    for user in (ADA, ADA, BOB):
        await within(store.add("a", user))
    assert await within(store.add("b", CAROL)) is True
    assert await within(store.add("b", ADA)) is True  # rooms are separate
    assert await within(store.snapshot("a", 10)) == (2, [ADA, BOB])
    assert await within(store.snapshot("b", 10)) == (2, [CAROL, ADA])
    assert await within(store.remove("a", ADA)) is False
    assert await within(store.snapshot("a", 10)) == (2, [ADA, BOB])
    assert await within(store.remove("a", BOB)) is True
    assert await within(store.remove("a", ADA)) is True
    assert await within(store.snapshot("a", 10)) == (0, [])
    assert await within(store.snapshot("b", 10)) == (2, [CAROL, ADA])


async def test_limit_keeps_the_exact_count_and_the_first_arrivals(store: PresenceStore) -> None:
    users = [User(f"u{i}", f"User {i}") for i in range(5)]
    for user in users:
        await within(store.add("r", user))
    await within(store.add("r", users[0]))  # a second connection keeps its place
    assert await within(store.snapshot("r", 3)) == (5, users[:3])
    assert await within(store.snapshot("r", 0)) == (5, [])
    assert await within(store.snapshot("r", 100)) == (5, users)
    await within(store.remove("r", users[1]))
    assert await within(store.snapshot("r", 2)) == (4, [users[0], users[2]])


async def test_removing_an_unknown_user_or_room(store: PresenceStore) -> None:
    assert await within(store.remove("nowhere", ADA)) is False
    await within(store.add("r", ADA))
    assert await within(store.remove("r", BOB)) is False
    assert await within(store.snapshot("r", 10)) == (1, [ADA])
    assert await within(store.snapshot("nowhere", 10)) == (0, [])
    assert await within(store.remove("r", ADA)) is True
    assert await within(store.remove("r", ADA)) is False


async def test_any_user_id_and_name(store: PresenceStore) -> None:
    users = [
        User("a|b", "pipe"),
        User("a", "prefix of a|b"),
        User("x:{room}:y", "colons and braces"),
        User("ünï👋", "Zoë 👋"),
        User("s" * 300, "long"),
        User("", "empty id"),
        User("nameless", ""),
    ]
    for user in users:
        assert await within(store.add("room_1.a-b:c", user)) is True
    assert await within(store.snapshot("room_1.a-b:c", 100)) == (len(users), users)
    for user in users:
        assert await within(store.remove("room_1.a-b:c", user)) is True
    assert await within(store.snapshot("room_1.a-b:c", 100)) == (0, [])


async def test_the_latest_name_is_listed(store: PresenceStore) -> None:
    await within(store.add("r", ADA))
    await within(store.add("r", User(ADA.id, "Ada L.")))
    assert await within(store.snapshot("r", 10)) == (1, [User(ADA.id, "Ada L.")])


async def test_nul_backslashes_and_lone_surrogates_round_trip(store: PresenceStore) -> None:
    # PostgreSQL text holds neither NUL nor lone surrogates; its store escapes them.
    users = [
        User("nul\x00", "nul\x00name"),
        User("nul\\0", "escaped-looking \\0 \\u0041 \\\\"),
        User("\ud800", "lone \udfff surrogate"),
        User("\\ud800", "its escaped look-alike"),
    ]
    for user in users:
        assert await within(store.add("odd\x00room\\", user)) is True
    assert await within(store.snapshot("odd\x00room\\", 100)) == (len(users), users)
    assert await within(store.snapshot("odd\\0room\\", 100)) == (0, [])
    for user in users:
        assert await within(store.remove("odd\x00room\\", user)) is True


# --- Redis across workers ------------------------------------------------------


async def test_a_user_on_two_workers_is_first_once_and_last_once(workers: Workers) -> None:
    a, b = await workers.open(), await workers.open()
    assert a.worker != b.worker
    assert await within(a.add("r", ADA)) is True
    assert await within(b.add("r", ADA)) is False
    assert await within(b.add("r", ADA)) is False
    for p in (a, b):
        assert await within(p.snapshot("r", 10)) == (1, [ADA])
    assert await within(a.remove("r", ADA)) is False
    assert await within(b.remove("r", ADA)) is False
    assert await within(a.snapshot("r", 10)) == (1, [ADA])
    assert await within(b.remove("r", ADA)) is True
    assert await within(a.snapshot("r", 10)) == (0, [])


async def test_snapshots_see_the_users_of_every_worker(workers: Workers) -> None:
    a, b = await workers.open(), await workers.open()
    await within(a.add("r", ADA))
    await within(b.add("r", BOB))
    await within(a.add("r", CAROL))
    for p in (a, b):
        assert await within(p.snapshot("r", 10)) == (3, [ADA, BOB, CAROL])
        assert await within(p.snapshot("r", 1)) == (3, [ADA])
    assert await within(b.remove("r", BOB)) is True
    assert await within(a.snapshot("r", 10)) == (2, [ADA, CAROL])


async def test_concurrent_workers_decide_first_and_last_exactly_once(workers: Workers) -> None:
    ps = [await workers.open() for _ in range(3)]
    users = [User(f"u{i}", f"U{i}") for i in range(20)]
    firsts = await within(asyncio.gather(*(p.add("r", u) for u in users for p in ps)))
    for i in range(len(users)):
        assert sum(firsts[i * len(ps) : (i + 1) * len(ps)]) == 1
    online, _ = await within(ps[0].snapshot("r", 0))
    assert online == len(users)
    lasts = await within(asyncio.gather(*(p.remove("r", u) for u in users for p in ps)))
    for i in range(len(users)):
        assert sum(lasts[i * len(ps) : (i + 1) * len(ps)]) == 1
    assert await within(ps[1].snapshot("r", 10)) == (0, [])
    base = f"{workers.prefix}:{{presence}}:"
    assert await workers.keys() == {base + "leases"} | {f"{base}lease:{p.worker}" for p in ps}


async def test_a_crashed_worker_leaves_snapshots_within_the_ttl(workers: Workers) -> None:
    ttl = 1.0
    a, b = await workers.open(), await workers.open(ttl)
    await within(b.add("r", ADA))
    await within(b.add("r", BOB))
    await within(a.add("r", ADA))
    await within(a.add("other", CAROL))
    assert (await within(a.snapshot("r", 10)))[0] == 2
    await crash(b)
    crashed = time.monotonic()
    assert await eventually(lambda: a.snapshot("r", 10), lambda s: s[0] == 1) == (1, [ADA])
    assert time.monotonic() - crashed < ttl + 0.5
    # The crashed worker's counts are gone: Bob is new again, Ada leaves with a's last.
    assert await within(a.add("r", BOB)) is True
    assert await within(a.remove("r", BOB)) is True
    assert await within(a.remove("r", ADA)) is True
    # Reaping left no trace of b.
    assert not [key for key in await workers.keys() if b.worker in key]


async def test_a_crash_leaves_no_keys_in_rooms_nobody_looks_at(workers: Workers) -> None:
    b = await workers.open(0.5)
    await within(b.add("quiet", ADA))
    await within(b.add("quiet", BOB))
    assert await workers.keys()
    await crash(b)
    await eventually(workers.keys, lambda keys: not keys)


async def test_a_live_worker_stays_past_its_ttl(workers: Workers) -> None:
    a, b = await workers.open(), await workers.open(0.5)
    await within(b.add("r", ADA))
    await within(b.add("r2", BOB))
    deadline = time.monotonic() + 2.0  # four leases long
    while time.monotonic() < deadline:
        assert await within(a.snapshot("r", 10)) == (1, [ADA])
        assert await within(a.snapshot("r2", 10)) == (1, [BOB])
        await asyncio.sleep(0.1)
    assert await within(b.remove("r", ADA)) is True


async def test_stop_withdraws_the_worker_and_leaves_no_keys(workers: Workers) -> None:
    a, b = await workers.open(), await workers.open()
    for room in ("r1", "r2"):
        await within(a.add(room, ADA))
        await within(a.add(room, BOB))
        await within(b.add(room, BOB))
    await within(a.add("r3", CAROL))
    await within(a.stop())  # without removing anything first
    assert not [key for key in await workers.keys() if a.worker in key]
    for room in ("r1", "r2"):
        assert await within(b.snapshot(room, 10)) == (1, [BOB])
    assert await within(b.snapshot("r3", 10)) == (0, [])
    await within(b.stop())
    assert await workers.keys() == set()
    await within(b.stop())  # twice is harmless


async def test_a_lost_lease_and_data_are_restored(workers: Workers) -> None:
    a = await workers.open(1.0)
    await within(a.add("r", ADA))
    await within(a.add("r", ADA))
    await within(a.add("r", BOB))
    await within(workers.raw.delete(*await workers.keys()))  # as a Redis restart would
    assert await eventually(lambda: a.snapshot("r", 10), lambda s: s[0] == 2) == (2, [ADA, BOB])
    # The counts came back too: Ada has two connections.
    assert await within(a.remove("r", ADA)) is False
    assert await within(a.remove("r", ADA)) is True
    assert await within(a.remove("r", BOB)) is True


async def test_an_add_that_finds_its_lease_gone_restores_at_once(workers: Workers) -> None:
    a, b = await workers.open(), await workers.open()  # renewals only every 10 s
    await within(a.add("r", ADA))
    await within(a.add("s", BOB))
    lease = f"{workers.prefix}:{{presence}}:lease:{a.worker}"
    await within(workers.raw.delete(lease))
    assert await within(b.snapshot("r", 10)) == (0, [])  # a is taken for dead
    await within(a.add("r", CAROL))
    await eventually(lambda: b.snapshot("s", 10), lambda s: s == (1, [BOB]), within_s=5.0)
    # Carol arrived before Ada was restored.
    assert await within(b.snapshot("r", 10)) == (2, [CAROL, ADA])
    assert await within(workers.raw.exists(lease)) == 1


async def test_cancelled_calls_are_repaired(workers: Workers) -> None:
    a, b = await workers.open(), await workers.open()
    await within(a.add("r", ADA))
    await within(workers.raw.client_pause(2000, all=False))  # writes (and scripts) wait
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(a.remove("r", ADA), 0.2)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(a.add("r", BOB), 0.2)
    finally:
        await within(workers.raw.client_unpause())
    assert len(a) == 0  # a counts no connection any more
    assert await eventually(lambda: b.snapshot("r", 10), lambda s: s[0] == 0) == (0, [])
    assert await within(a.add("r", ADA)) is True


async def test_a_remove_cancelled_while_a_restore_holds_it_off(workers: Workers) -> None:
    a, b = await workers.open(), await workers.open()
    await within(a.add("r", ADA))
    a._gate.clear()  # as while a resync runs
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(a.remove("r", ADA), 0.2)
    assert len(a) == 0  # the connection is gone all the same; the next resync says so
    assert await eventually(lambda: b.snapshot("r", 10), lambda s: s[0] == 0) == (0, [])
    assert a._gate.is_set()


async def test_long_lists_are_read_in_batches(
    workers: Workers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(presence_redis, "_NAMES_BATCH", 3)
    a = await workers.open()
    users = [User(f"u{i}", f"User {i}") for i in range(8)]
    for user in users:
        await within(a.add("r", user))
    assert await within(a.snapshot("r", 7)) == (8, users[:7])
    assert await within(a.snapshot("r", 100)) == (8, users)


def test_url_prefix() -> None:
    presence = RedisPresence("redis://h:1/2?prefix=app.one&ssl_cert_reqs=none", 30)
    assert (presence.url, presence.prefix) == ("redis://h:1/2?ssl_cert_reqs=none", "app.one")
    assert RedisPresence("redis://h", 30).prefix == "roomcast"
    with pytest.raises(SettingsError, match="prefix"):
        RedisPresence("redis://h?prefix={x}", 30)


async def test_calls_outside_start_and_stop(workers: Workers) -> None:
    presence = RedisPresence(workers.url, 30)
    with pytest.raises(ConnectionError, match="not started"):
        await within(presence.add("r", ADA))
    await within(presence.stop())  # nothing to stop
    await within(presence.start())
    await within(presence.add("r", ADA))
    await within(presence.stop())
    # A connection that goes after the stop: nothing left to remove.
    assert await within(presence.remove("r", ADA)) is False
    with pytest.raises(ConnectionError, match="not started"):
        await within(presence.snapshot("r", 10))
    assert await workers.keys() == set()


# --- PostgreSQL across workers -------------------------------------------------


async def pg_crash(presence: PostgresPresence) -> None:
    """End a worker as a crash would: no more renewals, nothing withdrawn."""
    task, presence._task = presence._task, None
    assert task is not None
    task.cancel()
    await within(asyncio.gather(task, return_exceptions=True))
    pool, presence._pool = presence._pool, None
    assert pool is not None
    pool.terminate()


async def test_pg_a_user_on_two_workers_is_first_once_and_last_once(pg_workers: PgWorkers) -> None:
    a, b = await pg_workers.open(), await pg_workers.open()
    assert a.worker != b.worker
    assert await within(a.add("r", ADA)) is True
    assert await within(b.add("r", ADA)) is False
    assert await within(b.add("r", ADA)) is False
    for p in (a, b):
        assert await within(p.snapshot("r", 10)) == (1, [ADA])
    assert await within(a.remove("r", ADA)) is False
    assert await within(b.remove("r", ADA)) is False
    assert await within(a.snapshot("r", 10)) == (1, [ADA])
    assert await within(b.remove("r", ADA)) is True
    assert await within(a.snapshot("r", 10)) == (0, [])
    assert await pg_workers.rows() == set()


async def test_pg_the_latest_name_on_any_worker_is_listed(pg_workers: PgWorkers) -> None:
    a, b = await pg_workers.open(), await pg_workers.open()
    await within(a.add("r", ADA))
    await within(b.add("r", User(ADA.id, "Ada L.")))
    assert await within(a.snapshot("r", 10)) == (1, [User(ADA.id, "Ada L.")])
    assert await within(b.remove("r", ADA)) is False
    assert await within(a.snapshot("r", 10)) == (1, [User(ADA.id, "Ada L.")])


async def test_pg_snapshots_see_the_users_of_every_worker(pg_workers: PgWorkers) -> None:
    a, b = await pg_workers.open(), await pg_workers.open()
    await within(a.add("r", ADA))
    await within(b.add("r", BOB))
    await within(a.add("r", CAROL))
    await within(b.add("r", ADA))  # keeps her place
    for p in (a, b):
        assert await within(p.snapshot("r", 10)) == (3, [ADA, BOB, CAROL])
        assert await within(p.snapshot("r", 1)) == (3, [ADA])
    assert await within(a.remove("r", ADA)) is False
    assert await within(b.snapshot("r", 10)) == (3, [ADA, BOB, CAROL])  # still first
    assert await within(b.remove("r", BOB)) is True
    assert await within(a.snapshot("r", 10)) == (2, [ADA, CAROL])


async def test_pg_concurrent_workers_decide_first_and_last_exactly_once(
    pg_workers: PgWorkers,
) -> None:
    ps = [await pg_workers.open() for _ in range(3)]
    users = [User(f"u{i}", f"U{i}") for i in range(20)]
    for _ in range(2):  # again, with the tables no longer empty of history
        firsts = await within(asyncio.gather(*(p.add("r", u) for u in users for p in ps)))
        for i in range(len(users)):
            assert sum(firsts[i * len(ps) : (i + 1) * len(ps)]) == 1
        online, _ = await within(ps[0].snapshot("r", 0))
        assert online == len(users)
        lasts = await within(asyncio.gather(*(p.remove("r", u) for u in users for p in ps)))
        for i in range(len(users)):
            assert sum(lasts[i * len(ps) : (i + 1) * len(ps)]) == 1
        assert await within(ps[1].snapshot("r", 10)) == (0, [])
    assert await pg_workers.rows() == set()
    assert await pg_workers.leases() == {p.worker for p in ps}


async def test_pg_interleaved_comings_and_goings_pair_up(pg_workers: PgWorkers) -> None:
    ps = [await pg_workers.open() for _ in range(3)]
    users = [User(f"u{i}", f"U{i}") for i in range(8)]
    events: dict[str, list[str]] = {u.id: [] for u in users}

    async def visits(p: PostgresPresence, user: User) -> None:
        for _ in range(3):
            if await p.add("r", user):
                events[user.id].append("first")
            if await p.remove("r", user):
                events[user.id].append("last")

    await within(asyncio.gather(*(visits(p, u) for u in users for p in ps)), 30.0)
    for user in users:
        # Every arrival in the room has its departure (the order in which the answers
        # reach this process is not the order of the decisions: only counts are checked).
        assert events[user.id].count("first") == events[user.id].count("last") >= 1
    assert await within(ps[0].snapshot("r", 10)) == (0, [])
    assert await pg_workers.rows() == set()


async def test_pg_a_crashed_worker_leaves_snapshots_within_the_ttl(pg_workers: PgWorkers) -> None:
    ttl = 1.0
    a, b = await pg_workers.open(), await pg_workers.open(ttl)  # a collects every 10 s
    await within(b.add("r", ADA))
    await within(b.add("r", BOB))
    await within(a.add("r", ADA))
    await within(a.add("other", CAROL))
    assert (await within(a.snapshot("r", 10)))[0] == 2
    await pg_crash(b)
    crashed = time.monotonic()
    assert await eventually(lambda: a.snapshot("r", 10), lambda s: s[0] == 1) == (1, [ADA])
    assert time.monotonic() - crashed < ttl + 0.5
    # Ignored before they are deleted: b's rows are still there.
    assert ("r", b.worker, BOB.id) in await pg_workers.rows()
    # The crashed worker's counts are gone: Bob is new again, Ada leaves with a's last.
    assert await within(a.add("r", BOB)) is True
    assert await within(a.remove("r", BOB)) is True
    assert await within(a.remove("r", ADA)) is True
    # A worker that renews often collects b's rows and lease soon.
    await pg_workers.open(0.3)

    async def traces() -> list[object]:
        rows = [row for row in await pg_workers.rows() if row[1] == b.worker]
        return [*rows, *(w for w in await pg_workers.leases() if w == b.worker)]

    await eventually(traces, lambda found: not found)


async def test_pg_a_crash_leaves_no_rows_in_rooms_nobody_looks_at(pg_workers: PgWorkers) -> None:
    a, b = await pg_workers.open(0.5), await pg_workers.open(0.5)
    await within(b.add("quiet", ADA))
    await within(b.add("quiet", BOB))
    assert await pg_workers.rows()
    await pg_crash(b)
    await eventually(pg_workers.rows, lambda rows: not rows)
    await eventually(pg_workers.leases, lambda leases: leases == {a.worker})


async def test_pg_a_starting_worker_sweeps_what_a_crash_left(pg_workers: PgWorkers) -> None:
    b = await pg_workers.open(0.3)
    await within(b.add("quiet", ADA))
    await pg_crash(b)  # and no worker left to collect
    expired = 'SELECT count(*) = 0 FROM "{p}_presence_workers" WHERE expires > now()'

    async def lapsed() -> bool:
        return bool((await pg_workers.sql(expired))[0][0])

    await eventually(lapsed, bool)
    assert await pg_workers.rows() == {("quiet", b.worker, ADA.id)}
    await pg_workers.open()
    assert await pg_workers.rows() == set()


async def test_pg_a_live_worker_stays_past_its_ttl(pg_workers: PgWorkers) -> None:
    a, b = await pg_workers.open(), await pg_workers.open(0.5)
    await within(b.add("r", ADA))
    await within(b.add("r2", BOB))
    deadline = time.monotonic() + 2.0  # four leases long
    while time.monotonic() < deadline:
        assert await within(a.snapshot("r", 10)) == (1, [ADA])
        assert await within(a.snapshot("r2", 10)) == (1, [BOB])
        await asyncio.sleep(0.1)
    assert await within(b.remove("r", ADA)) is True


async def test_pg_stop_withdraws_the_worker_and_leaves_no_rows(pg_workers: PgWorkers) -> None:
    a, b = await pg_workers.open(), await pg_workers.open()
    for room in ("r1", "r2"):
        await within(a.add(room, ADA))
        await within(a.add(room, BOB))
        await within(b.add(room, BOB))
    await within(a.add("r3", CAROL))
    await within(a.stop())  # without removing anything first
    assert not [row for row in await pg_workers.rows() if row[1] == a.worker]
    assert a.worker not in await pg_workers.leases()
    for room in ("r1", "r2"):
        assert await within(b.snapshot(room, 10)) == (1, [BOB])
    assert await within(b.snapshot("r3", 10)) == (0, [])
    await within(b.stop())
    assert await pg_workers.rows() == set()
    assert await pg_workers.leases() == set()
    await within(b.stop())  # twice is harmless


async def test_pg_a_lost_lease_and_rows_are_restored(pg_workers: PgWorkers) -> None:
    a = await pg_workers.open(1.0)
    await within(a.add("r", ADA))
    await within(a.add("r", ADA))
    await within(a.add("r", BOB))
    await pg_workers.sql('DELETE FROM "{p}_presence"')  # as a lost database would
    await pg_workers.sql('DELETE FROM "{p}_presence_workers"')
    assert await eventually(lambda: a.snapshot("r", 10), lambda s: s[0] == 2) == (2, [ADA, BOB])
    # The counts came back too: Ada has two connections.
    assert await within(a.remove("r", ADA)) is False
    assert await within(a.remove("r", ADA)) is True
    assert await within(a.remove("r", BOB)) is True


async def test_pg_dropped_tables_are_made_again_and_restored(pg_workers: PgWorkers) -> None:
    a = await pg_workers.open(1.0)
    await within(a.add("r", ADA))
    await within(a.add("r", BOB))
    await pg_workers.sql('DROP TABLE "{p}_presence", "{p}_presence_workers"')
    await pg_workers.sql('DROP SEQUENCE "{p}_presence_since"')

    async def probe() -> tuple[int, list[User]] | None:
        try:
            return await a.snapshot("r", 10)
        except asyncpg.UndefinedTableError:
            return None

    assert await eventually(probe, lambda s: s is not None and s[0] == 2) == (2, [ADA, BOB])
    assert await within(a.remove("r", ADA)) is True
    assert await within(a.add("r", CAROL)) is True
    assert await within(a.snapshot("r", 10)) == (2, [BOB, CAROL])


async def test_pg_an_add_that_finds_its_lease_gone_restores_at_once(pg_workers: PgWorkers) -> None:
    a, b = await pg_workers.open(), await pg_workers.open()  # renewals only every 10 s
    await within(a.add("r", ADA))
    await within(a.add("s", BOB))
    await pg_workers.sql('DELETE FROM "{p}_presence_workers" WHERE worker = $1', a.worker)
    assert await within(b.snapshot("r", 10)) == (0, [])  # a is taken for dead
    assert await within(a.add("r", CAROL)) is True
    await eventually(lambda: b.snapshot("s", 10), lambda s: s == (1, [BOB]), within_s=5.0)
    # Carol arrived before Ada was restored.
    assert await within(b.snapshot("r", 10)) == (2, [CAROL, ADA])
    assert a.worker in await pg_workers.leases()
    assert await within(a.remove("r", ADA)) is True
    assert await within(a.remove("r", CAROL)) is True


async def test_pg_cancelled_calls_are_repaired(pg_workers: PgWorkers) -> None:
    a, b = await pg_workers.open(), await pg_workers.open()
    await within(a.add("r", ADA))
    # Hold the room's lock, as a worker stuck in a decision about it would.
    lock = """SELECT pg_advisory_lock(hashtext('"{p}_presence"'), hashtext('r'))"""
    await pg_workers.sql(lock)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(a.remove("r", ADA), 0.2)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(a.add("r", BOB), 0.2)
    finally:
        await pg_workers.sql(lock.replace("pg_advisory_lock", "pg_advisory_unlock"))
    assert len(a) == 0  # a counts no connection any more
    assert await eventually(lambda: b.snapshot("r", 10), lambda s: s[0] == 0) == (0, [])
    assert await within(a.add("r", ADA)) is True
    assert await within(b.add("r", ADA)) is False


async def test_pg_a_remove_cancelled_while_a_restore_holds_it_off(pg_workers: PgWorkers) -> None:
    a, b = await pg_workers.open(), await pg_workers.open()
    await within(a.add("r", ADA))
    a._gate.clear()  # as while a resync runs
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(a.remove("r", ADA), 0.2)
    assert len(a) == 0  # the connection is gone all the same; the next resync says so
    assert await eventually(lambda: b.snapshot("r", 10), lambda s: s[0] == 0) == (0, [])
    assert a._gate.is_set()


async def test_pg_a_postgres_restart_is_survived() -> None:
    server = await within(asyncio.to_thread(start_postgres), 60.0)
    try:
        pg = PgWorkers(server.url)
        try:
            a, b = await pg.open(0.5), await pg.open(0.5)
            await within(a.add("r", ADA))
            await within(b.add("r", BOB))
            # With -l, the new postmaster leaves the captured stdout alone.
            restart = [*server.as_user, server.pg_ctl, "-D", str(server.dir / "data"),
                       "-l", str(server.dir / "log"), "-m", "fast", "-w", "restart"]  # fmt: skip
            done = await within(
                asyncio.to_thread(
                    subprocess.run, restart, capture_output=True, text=True, timeout=50
                ),
                60.0,
            )
            assert done.returncode == 0, done.stderr + server.log()
            # And the leases ran out meanwhile, as in a longer outage.
            # Their rows are then invisible until each worker takes them back from memory.
            await pg.sql('UPDATE "{p}_presence_workers" SET expires = now()')

            async def probe() -> tuple[int, list[User]] | None:
                try:
                    return await a.snapshot("r", 10)
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    return None  # the pool's connections died with the server

            # Both back (in the order the two workers happened to restore them).
            online = await eventually(probe, lambda s: s is not None and s[0] == 2)
            assert online is not None and sorted(ids(online[1])) == [ADA.id, BOB.id]
            assert await within(a.add("r", BOB)) is False
            assert await within(b.remove("r", BOB)) is False
            assert await within(a.remove("r", BOB)) is True
            assert await within(b.snapshot("r", 10)) == (1, [ADA])
        finally:
            await pg.close()
    finally:
        await within(asyncio.to_thread(server.stop), 60.0)


def test_pg_url_prefix() -> None:
    presence = PostgresPresence("postgres://u@h:1/db?prefix=app.one&sslmode=disable", 30)
    assert (presence.url, presence.prefix) == ("postgres://u@h:1/db?sslmode=disable", "app.one")
    assert PostgresPresence("postgresql://h/db", 30).prefix == "roomcast"
    for bad in ('x"y', "", "a" * 41, "a b"):
        with pytest.raises(SettingsError, match="prefix"):
            PostgresPresence(f"postgres://h/db?prefix={bad}", 30)


async def test_pg_calls_outside_start_and_stop(pg_workers: PgWorkers) -> None:
    presence = PostgresPresence(pg_workers.url, 30)
    with pytest.raises(ConnectionError, match="not started"):
        await within(presence.add("r", ADA))
    await within(presence.stop())  # nothing to stop
    await within(presence.start())
    await within(presence.add("r", ADA))
    await within(presence.stop())
    # A connection that goes after the stop: nothing left to remove.
    assert await within(presence.remove("r", ADA)) is False
    with pytest.raises(ConnectionError, match="not started"):
        await within(presence.snapshot("r", 10))
    assert await pg_workers.rows() == set()
    assert await pg_workers.leases() == set()


def presence_for(settings: Settings) -> PresenceStore:
    return open_presence(settings.broadcast_url, settings.history_url, settings.presence_ttl)


def test_open_presence_picks_redis_then_postgres() -> None:
    pg, redis = "postgres://h/db", "redis://h/0"
    assert isinstance(presence_for(Settings(broadcast_url=pg)), PostgresPresence)
    assert isinstance(
        presence_for(Settings(broadcast_url="postgresql://h/db", history_url="memory://")),
        PostgresPresence,
    )
    assert isinstance(
        presence_for(Settings(broadcast_url="kafka://h:9092", history_url=pg)), PostgresPresence
    )
    assert isinstance(presence_for(Settings(broadcast_url=pg, history_url=redis)), RedisPresence)
    assert isinstance(presence_for(Settings(broadcast_url=redis, history_url=pg)), RedisPresence)
    assert isinstance(presence_for(Settings(history_url=pg)), LocalPresence)  # one process


async def test_workers_counts_live_leases(workers: Workers) -> None:
    a, b = await workers.open(), await workers.open(1.0)
    assert await within(a.workers()) == await within(b.workers()) == 2
    c = await workers.open()
    await within(c.stop())
    workers.started.remove(c)
    assert await within(a.workers()) == 2
    await crash(b)
    await eventually(a.workers, lambda n: n == 1)
    # Pruned: the crashed worker's id is gone from the set, not just skipped.
    assert b.worker not in await within(workers.raw.smembers(a._base + "leases"))


async def test_pg_workers_counts_live_leases(pg_workers: PgWorkers) -> None:
    a, b = await pg_workers.open(), await pg_workers.open(1.0)
    assert await within(a.workers()) == await within(b.workers()) == 2
    c = await pg_workers.open()
    await within(c.stop())
    pg_workers.started.remove(c)
    assert await within(a.workers()) == 2
    await pg_crash(b)
    await eventually(a.workers, lambda n: n == 1)


async def test_local_presence_is_one_worker() -> None:
    assert await within(LocalPresence().workers()) == 1
