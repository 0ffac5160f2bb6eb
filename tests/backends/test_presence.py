"""Presence: the contract of every `PresenceStore`, and the shared stores across workers.

`store` runs the contract over LocalPresence, Redis and PostgreSQL. `shared`
runs the cross-worker behaviour over Redis and PostgreSQL: several store
objects on one real server, under a prefix of their own, stand for several
workers. Where the two stores differ (keys or rows left behind, a crashed
worker's entries reaped at once or collected later), the fixture says so and
the test asks it. The few tests of one store's own mechanics are named after it.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol, cast

import asyncpg
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from roomcast.backends.presence import redis as presence_redis
from roomcast.backends.presence.base import PresenceStore
from roomcast.backends.presence.factory import open_presence
from roomcast.backends.presence.leased import LeasedPresence
from roomcast.backends.presence.local import LocalPresence
from roomcast.backends.presence.postgres import PostgresPresence
from roomcast.backends.presence.redis import RedisPresence
from roomcast.errors import SettingsError
from roomcast.protocol.envelopes import User
from roomcast.settings import Settings

from ..brokers import PostgresServer, RedisServer, start_postgres, start_redis
from ..waiting import eventually, within

ADA, BOB, CAROL = User("u-ada", "Ada"), User("u-bob", "Bob"), User("u-carol", "Carol")
SHARED = ["redis", "postgres"]


class Workers(ABC):
    """Store objects on one server under one prefix, as workers would be.

    Each store says how it differs: `traces()` is everything it holds under the
    prefix, one string per key (Redis) or row (Postgres); `idle(*ws)` what that
    is while those workers live and count nothing; `entry(room, w, user)` the
    trace holding w's connections of user; `roster()` the workers it lists as
    leased (Redis's `leases` set, which `workers()` prunes; Postgres's unexpired
    leases). `lazy`: a crashed worker's entries stay, ignored, until a live
    worker collects them (Postgres), rather than being reaped by the next call
    about their room and otherwise expiring (Redis).
    """

    lazy: bool
    down: tuple[type[BaseException], ...]  # what a call may raise while the server is away

    def __init__(self, url: str) -> None:
        self.prefix = f"t{secrets.token_hex(4)}"
        self.server_url, self.url = url, f"{url}?prefix={self.prefix}"
        self.started: list[LeasedPresence] = []

    @abstractmethod
    def new(self, ttl: float = 30.0) -> LeasedPresence: ...
    @abstractmethod
    async def traces(self) -> set[str]: ...
    @abstractmethod
    def idle(self, *workers: LeasedPresence) -> set[str]: ...
    @abstractmethod
    def entry(self, room: str, worker: LeasedPresence, user: User) -> str: ...
    @abstractmethod
    async def roster(self) -> set[str]: ...
    @abstractmethod
    async def lose_lease(self, worker: LeasedPresence) -> None: ...
    @abstractmethod
    async def lose_all(self) -> None: ...  # as a restarted Redis or a lost database would
    @abstractmethod
    def hold(self, room: str) -> AbstractAsyncContextManager[None]: ...  # decisions wait
    @abstractmethod
    async def restart(self) -> None: ...  # the test's own server; every lease runs out
    @abstractmethod
    async def _cut(self, presence: Any, handle: Any) -> None: ...  # without a word

    async def open(self, ttl: float = 30.0) -> LeasedPresence:
        presence = self.new(ttl)
        await within(presence.start())
        self.started.append(presence)
        return presence

    async def crash(self, presence: LeasedPresence) -> None:
        """End a worker as a crash would: no more renewals, nothing withdrawn."""
        task, presence._task = presence._task, None
        assert task is not None
        task.cancel()
        await within(asyncio.gather(task, return_exceptions=True))
        handle = presence._detach()
        assert handle is not None
        await self._cut(presence, handle)

    async def of(self, worker: LeasedPresence) -> set[str]:
        return {trace for trace in await self.traces() if worker.worker in trace}

    async def collectors(self) -> list[LeasedPresence]:
        """The live workers it takes to delete what a crash left in rooms nobody looks at."""
        return [await self.open(0.3)] if self.lazy else []  # renews, and collects, often

    async def cleared(self, crashed: LeasedPresence) -> None:
        """No trace of a crashed worker is left once its rooms were looked at."""
        if not self.lazy:
            assert not await self.of(crashed)  # the scripts reaped it at once
            return
        await self.collectors()
        await eventually(lambda: self.of(crashed), lambda found: not found)

    async def close(self) -> None:
        for presence in self.started:
            await within(presence.stop())


class RedisWorkers(Workers):
    lazy, down = False, (OSError, redis.exceptions.RedisError)

    def __init__(self, url: str, server: RedisServer | None = None) -> None:
        super().__init__(url)
        self.server, self.base = server, f"{self.prefix}:{{presence}}:"
        self.raw = aioredis.Redis.from_url(url, decode_responses=True)

    def new(self, ttl: float = 30.0) -> RedisPresence:
        return RedisPresence(self.url, ttl)

    async def traces(self) -> set[str]:
        async def scan() -> set[str]:
            return {key async for key in self.raw.scan_iter(match=self.prefix + ":*", count=1000)}

        return {key.removeprefix(self.base) for key in await within(scan())}

    def idle(self, *workers: LeasedPresence) -> set[str]:
        return {"leases", *(f"lease:{w.worker}" for w in workers)} if workers else set()

    def entry(self, room: str, worker: LeasedPresence, user: User) -> str:
        return f"conn:{worker.worker}:{room}"  # the user is a field of that hash

    async def roster(self) -> set[str]:
        leases = cast(Awaitable[set[str]], self.raw.smembers(self.base + "leases"))
        return set(await within(leases))

    async def lose_lease(self, worker: LeasedPresence) -> None:
        await within(self.raw.delete(f"{self.base}lease:{worker.worker}"))

    async def lose_all(self) -> None:
        await within(self.raw.delete(*(self.base + key for key in await self.traces())))

    @asynccontextmanager
    async def hold(self, room: str) -> AsyncIterator[None]:
        await within(self.raw.client_pause(2000, all=False))  # writes (and scripts) wait
        try:
            yield
        finally:
            await within(self.raw.client_unpause())

    async def restart(self) -> None:
        assert self.server is not None  # without persistence: every key is lost
        await within(asyncio.to_thread(self.server.stop, keep_data=True), 60.0)
        self.server = await within(asyncio.to_thread(start_redis, self.server), 60.0)

    async def _cut(self, presence: RedisPresence, client: aioredis.Redis) -> None:
        presence._scripts = {}
        await within(client.aclose())

    async def close(self) -> None:
        await super().close()
        await within(self.raw.aclose())


class PgConnection(Protocol):
    """What these tests use of an asyncpg connection (asyncpg ships no type hints)."""

    async def fetch(self, query: str, *args: object) -> list[asyncpg.Record]: ...
    async def close(self) -> None: ...
    def terminate(self) -> None: ...


class PostgresWorkers(Workers):
    lazy, down = True, (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)

    def __init__(self, url: str, server: PostgresServer | None = None) -> None:
        super().__init__(url)
        self.server = server
        self._raw: PgConnection | None = None

    def new(self, ttl: float = 30.0) -> PostgresPresence:
        return PostgresPresence(self.url, ttl)

    async def sql(self, query: str, *args: object) -> list[asyncpg.Record]:
        """Run `query` on a connection of its own; `{p}` is the table name prefix."""
        if self._raw is None:
            connected: PgConnection = await within(asyncpg.connect(self.server_url))
            self._raw = connected
        return await within(self._raw.fetch(query.replace("{p}", self.prefix), *args))

    async def rows(self) -> set[str]:
        found = await self.sql('SELECT room, worker, user_id FROM "{p}_presence"')
        return {f"row {r['room']} {r['worker']} {r['user_id']}" for r in found}

    async def traces(self) -> set[str]:
        leases = await self.sql('SELECT worker FROM "{p}_presence_workers"')
        return await self.rows() | {f"lease {r['worker']}" for r in leases}

    def idle(self, *workers: LeasedPresence) -> set[str]:
        return {f"lease {w.worker}" for w in workers}

    def entry(self, room: str, worker: LeasedPresence, user: User) -> str:
        return f"row {room} {worker.worker} {user.id}"

    async def roster(self) -> set[str]:
        live = 'SELECT worker FROM "{p}_presence_workers" WHERE expires > now()'
        return {r["worker"] for r in await self.sql(live)}

    async def lose_lease(self, worker: LeasedPresence) -> None:
        await self.sql('DELETE FROM "{p}_presence_workers" WHERE worker = $1', worker.worker)

    async def lose_all(self) -> None:
        await self.sql('DELETE FROM "{p}_presence"')
        await self.sql('DELETE FROM "{p}_presence_workers"')

    @asynccontextmanager
    async def hold(self, room: str) -> AsyncIterator[None]:
        # The room's lock, as a worker stuck in a decision about it would hold it.
        lock = """SELECT pg_advisory_lock(hashtext('"{p}_presence"'), hashtext($1))"""
        await self.sql(lock, room)
        try:
            yield
        finally:
            await self.sql(lock.replace("pg_advisory_lock", "pg_advisory_unlock"), room)

    async def restart(self) -> None:
        server, raw, self._raw = self.server, self._raw, None
        assert server is not None
        if raw is not None:
            raw.terminate()
        # With -l, the new postmaster leaves the captured stdout alone.
        restart = [*server.as_user, server.pg_ctl, "-D", str(server.dir / "data"),
                   "-l", str(server.dir / "log"), "-m", "fast", "-w", "restart"]  # fmt: skip
        run = asyncio.to_thread(subprocess.run, restart, capture_output=True, text=True, timeout=50)
        done = await within(run, 60.0)
        assert done.returncode == 0, done.stderr + server.log()
        # As in a longer outage: the rows are invisible until each worker takes them back.
        await self.sql('UPDATE "{p}_presence_workers" SET expires = now()')

    async def _cut(self, presence: PostgresPresence, pool: Any) -> None:
        pool.terminate()

    async def close(self) -> None:
        await super().close()
        if self._raw is not None:
            await within(self._raw.close())


@pytest.fixture
async def redis_workers(redis_url: str) -> AsyncIterator[RedisWorkers]:
    w = RedisWorkers(redis_url)
    yield w
    await w.close()


@pytest.fixture
async def postgres_workers(postgres_url: str) -> AsyncIterator[PostgresWorkers]:
    w = PostgresWorkers(postgres_url)
    yield w
    await w.close()


@pytest.fixture(params=SHARED)
def shared(request: pytest.FixtureRequest) -> Workers:
    workers: Workers = request.getfixturevalue(f"{request.param}_workers")
    return workers


@pytest.fixture(params=["local", *SHARED])
def backing(request: pytest.FixtureRequest) -> Workers | None:
    if request.param == "local":
        return None
    workers: Workers = request.getfixturevalue(f"{request.param}_workers")
    return workers


@pytest.fixture
async def store(backing: Workers | None) -> AsyncIterator[PresenceStore]:
    if backing is not None:
        yield await backing.open()
        return
    local = LocalPresence()
    await within(local.start())
    yield local
    await within(local.stop())


@pytest.fixture(params=SHARED)
async def own(request: pytest.FixtureRequest) -> AsyncIterator[Workers]:
    """Workers on a server of their own, which the test may restart."""
    if request.param == "redis":
        redis_server = await within(asyncio.to_thread(start_redis), 60.0)
        server: RedisServer | PostgresServer = redis_server
        w: Workers = RedisWorkers(redis_server.url, redis_server)
    else:
        server = pg_server = await within(asyncio.to_thread(start_postgres), 60.0)
        w = PostgresWorkers(pg_server.url, pg_server)
    try:
        yield w
        await w.close()
    finally:
        await within(asyncio.to_thread(server.stop), 60.0)  # the same port and folder


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


async def test_a_lone_store_counts_one_worker(store: PresenceStore) -> None:
    assert await within(store.workers()) == 1


# --- shared stores across workers ------------------------------------------------


async def test_a_user_on_two_workers_is_first_once_and_last_once(shared: Workers) -> None:
    a, b = await shared.open(), await shared.open()
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
    assert await shared.traces() == shared.idle(a, b)


async def test_the_latest_name_on_any_worker_is_listed(shared: Workers) -> None:
    a, b = await shared.open(), await shared.open()
    await within(a.add("r", ADA))
    await within(b.add("r", User(ADA.id, "Ada L.")))
    assert await within(a.snapshot("r", 10)) == (1, [User(ADA.id, "Ada L.")])
    assert await within(b.remove("r", ADA)) is False
    assert await within(a.snapshot("r", 10)) == (1, [User(ADA.id, "Ada L.")])


async def test_snapshots_see_the_users_of_every_worker(shared: Workers) -> None:
    a, b = await shared.open(), await shared.open()
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


async def test_concurrent_workers_decide_first_and_last_exactly_once(shared: Workers) -> None:
    ps = [await shared.open() for _ in range(3)]
    users = [User(f"u{i}", f"U{i}") for i in range(20)]
    for _ in range(2):  # again, with the store no longer empty of history
        firsts = await within(asyncio.gather(*(p.add("r", u) for u in users for p in ps)))
        for i in range(len(users)):
            assert sum(firsts[i * len(ps) : (i + 1) * len(ps)]) == 1
        online, _ = await within(ps[0].snapshot("r", 0))
        assert online == len(users)
        lasts = await within(asyncio.gather(*(p.remove("r", u) for u in users for p in ps)))
        for i in range(len(users)):
            assert sum(lasts[i * len(ps) : (i + 1) * len(ps)]) == 1
        assert await within(ps[1].snapshot("r", 10)) == (0, [])
    assert await shared.traces() == shared.idle(*ps)


async def test_interleaved_comings_and_goings_pair_up(shared: Workers) -> None:
    ps = [await shared.open() for _ in range(3)]
    users = [User(f"u{i}", f"U{i}") for i in range(8)]
    events: dict[str, list[str]] = {u.id: [] for u in users}

    async def visits(p: LeasedPresence, user: User) -> None:
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
    assert await shared.traces() == shared.idle(*ps)


async def test_a_crashed_worker_leaves_snapshots_within_the_ttl(shared: Workers) -> None:
    ttl = 1.0
    a, b = await shared.open(), await shared.open(ttl)  # a renews (and collects) every 10 s
    await within(b.add("r", ADA))
    await within(b.add("r", BOB))
    await within(a.add("r", ADA))
    await within(a.add("other", CAROL))
    assert (await within(a.snapshot("r", 10)))[0] == 2
    await shared.crash(b)
    crashed = time.monotonic()
    assert await eventually(lambda: a.snapshot("r", 10), lambda s: s[0] == 1) == (1, [ADA])
    assert time.monotonic() - crashed < ttl + 0.5
    # Reaped by that snapshot already (Redis), or ignored until collected (Postgres).
    assert (shared.entry("r", b, BOB) in await shared.traces()) is shared.lazy
    # The crashed worker's counts are gone: Bob is new again, Ada leaves with a's last.
    assert await within(a.add("r", BOB)) is True
    assert await within(a.remove("r", BOB)) is True
    assert await within(a.remove("r", ADA)) is True
    await shared.cleared(b)


async def test_a_crash_leaves_nothing_in_rooms_nobody_looks_at(shared: Workers) -> None:
    live = await shared.collectors()
    b = await shared.open(0.5)
    await within(b.add("quiet", ADA))
    await within(b.add("quiet", BOB))
    assert shared.entry("quiet", b, ADA) in await shared.traces()
    await shared.crash(b)
    await eventually(shared.traces, lambda found: found == shared.idle(*live))


async def test_a_live_worker_stays_past_its_ttl(shared: Workers) -> None:
    a, b = await shared.open(), await shared.open(0.5)
    await within(b.add("r", ADA))
    await within(b.add("r2", BOB))
    deadline = time.monotonic() + 2.0  # four leases long
    while time.monotonic() < deadline:
        assert await within(a.snapshot("r", 10)) == (1, [ADA])
        assert await within(a.snapshot("r2", 10)) == (1, [BOB])
        await asyncio.sleep(0.1)  # checked again and again until the deadline
    assert await within(b.remove("r", ADA)) is True


async def test_stop_withdraws_the_worker_and_leaves_nothing(shared: Workers) -> None:
    a, b = await shared.open(), await shared.open()
    for room in ("r1", "r2"):
        await within(a.add(room, ADA))
        await within(a.add(room, BOB))
        await within(b.add(room, BOB))
    await within(a.add("r3", CAROL))
    await within(a.stop())  # without removing anything first
    assert not await shared.of(a)
    for room in ("r1", "r2"):
        assert await within(b.snapshot(room, 10)) == (1, [BOB])
    assert await within(b.snapshot("r3", 10)) == (0, [])
    await within(b.stop())
    assert await shared.traces() == set()
    await within(b.stop())  # twice is harmless


@pytest.mark.parametrize("turns", [0, 1, 2])
async def test_stop_ends_a_keep_alive_that_was_just_woken(shared: Workers, turns: int) -> None:
    """A wake-up (trouble) and stop() in the same few loop turns: the cancellation of the
    keep-alive must not be lost (asyncio.wait_for on 3.11 lost it: stop() hung)."""
    worker = await shared.open()
    await within(worker.add("r1", ADA))
    worker._trouble()
    for _ in range(turns):
        await asyncio.sleep(0)  # let the woken wait finish, up to where it was swallowed
    await within(worker.stop())
    assert not await shared.of(worker)


async def test_a_lost_lease_and_data_are_restored(shared: Workers) -> None:
    a = await shared.open(1.0)
    await within(a.add("r", ADA))
    await within(a.add("r", ADA))
    await within(a.add("r", BOB))
    await shared.lose_all()
    assert await eventually(lambda: a.snapshot("r", 10), lambda s: s[0] == 2) == (2, [ADA, BOB])
    # The counts came back too: Ada has two connections.
    assert await within(a.remove("r", ADA)) is False
    assert await within(a.remove("r", ADA)) is True
    assert await within(a.remove("r", BOB)) is True


async def test_an_add_that_finds_its_lease_gone_restores_at_once(shared: Workers) -> None:
    a, b = await shared.open(), await shared.open()  # renewals only every 10 s
    await within(a.add("r", ADA))
    await within(a.add("s", BOB))
    await shared.lose_lease(a)
    assert await within(b.snapshot("r", 10)) == (0, [])  # a is taken for dead
    assert await within(a.add("r", CAROL)) is True
    await eventually(lambda: b.snapshot("s", 10), lambda s: s == (1, [BOB]), within_s=5.0)
    # Carol arrived before Ada was restored.
    assert await within(b.snapshot("r", 10)) == (2, [CAROL, ADA])
    assert shared.idle(a) <= await shared.traces()  # its lease is back
    assert await within(a.remove("r", ADA)) is True
    assert await within(a.remove("r", CAROL)) is True


async def test_cancelled_calls_are_repaired(shared: Workers) -> None:
    a, b = await shared.open(), await shared.open()
    await within(a.add("r", ADA))
    async with shared.hold("r"):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(a.remove("r", ADA), 0.2)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(a.add("r", BOB), 0.2)
    assert len(a) == 0  # a counts no connection any more
    assert await eventually(lambda: b.snapshot("r", 10), lambda s: s[0] == 0) == (0, [])
    assert await within(a.add("r", ADA)) is True
    assert await within(b.add("r", ADA)) is False


async def test_a_remove_cancelled_while_a_restore_holds_it_off(shared: Workers) -> None:
    a, b = await shared.open(), await shared.open()
    await within(a.add("r", ADA))
    a._gate.clear()  # as while a resync runs
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(a.remove("r", ADA), 0.2)
    assert len(a) == 0  # the connection is gone all the same; the next resync says so
    assert await eventually(lambda: b.snapshot("r", 10), lambda s: s[0] == 0) == (0, [])
    assert a._gate.is_set()


async def test_calls_outside_start_and_stop(shared: Workers) -> None:
    presence = shared.new()
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
    assert await shared.traces() == set()


async def test_workers_counts_live_leases(shared: Workers) -> None:
    a, b = await shared.open(), await shared.open(1.0)
    assert await within(a.workers()) == await within(b.workers()) == 2
    c = await shared.open()
    await within(c.stop())
    assert await within(a.workers()) == 2
    await shared.crash(b)
    await eventually(a.workers, lambda n: n == 1)
    # Pruned: the crashed worker's id is gone from the list, not just skipped.
    assert b.worker not in await shared.roster()


async def test_a_server_restart_is_survived(own: Workers) -> None:
    a, b = await own.open(0.5), await own.open(0.5)
    await within(a.add("r", ADA))
    await within(b.add("r", BOB))
    await own.restart()

    async def probe() -> tuple[int, list[User]] | None:
        try:
            return await a.snapshot("r", 10)
        except own.down:
            return None  # the connections died with the server

    # Both back (in the order the two workers happened to restore them).
    online = await eventually(probe, lambda s: s is not None and s[0] == 2)
    assert online is not None and sorted(u.id for u in online[1]) == [ADA.id, BOB.id]
    assert await within(a.add("r", BOB)) is False
    assert await within(b.remove("r", BOB)) is False
    assert await within(a.remove("r", BOB)) is True
    assert await within(b.snapshot("r", 10)) == (1, [ADA])


@pytest.mark.parametrize(
    ("cls", "url", "option", "longest"),
    [(RedisPresence, "redis://u@h:1/2", "ssl_cert_reqs=none", 64),
     (PostgresPresence, "postgres://u@h:1/db", "sslmode=disable", 40)],
)  # fmt: skip
def test_url_prefix(cls: Any, url: str, option: str, longest: int) -> None:
    presence = cls(f"{url}?prefix=app.one&{option}", 30)
    assert (presence.url, presence.prefix) == (f"{url}?{option}", "app.one")
    assert cls(url, 30).prefix == "roomcast"
    assert cls(f"{url}?prefix={'a' * longest}", 30).prefix == "a" * longest
    for bad in ('x"y', "", "a b", "{x}", "a" * (longest + 1)):
        with pytest.raises(SettingsError, match="prefix"):
            cls(f"{url}?prefix={bad}", 30)


# --- one store's own mechanics ---------------------------------------------------


async def test_redis_long_lists_are_read_in_batches(
    redis_workers: RedisWorkers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(presence_redis, "_NAMES_BATCH", 3)
    a = await redis_workers.open()
    users = [User(f"u{i}", f"User {i}") for i in range(8)]
    for user in users:
        await within(a.add("r", user))
    assert await within(a.snapshot("r", 7)) == (8, users[:7])
    assert await within(a.snapshot("r", 100)) == (8, users)


async def test_postgres_a_starting_worker_sweeps_what_a_crash_left(
    postgres_workers: PostgresWorkers,
) -> None:
    pg = postgres_workers
    b = await pg.open(0.3)
    await within(b.add("quiet", ADA))
    await pg.crash(b)  # and no worker left to collect
    await eventually(pg.roster, lambda live: not live)  # every lease lapsed
    assert await pg.rows() == {pg.entry("quiet", b, ADA)}
    await pg.open()
    assert await pg.rows() == set()


async def test_postgres_dropped_tables_are_made_again_and_restored(
    postgres_workers: PostgresWorkers,
) -> None:
    a = await postgres_workers.open(1.0)
    await within(a.add("r", ADA))
    await within(a.add("r", BOB))
    await postgres_workers.sql('DROP TABLE "{p}_presence", "{p}_presence_workers"')
    await postgres_workers.sql('DROP SEQUENCE "{p}_presence_since"')

    async def probe() -> tuple[int, list[User]] | None:
        try:
            return await a.snapshot("r", 10)
        except asyncpg.UndefinedTableError:
            return None

    assert await eventually(probe, lambda s: s is not None and s[0] == 2) == (2, [ADA, BOB])
    assert await within(a.remove("r", ADA)) is True
    assert await within(a.add("r", CAROL)) is True
    assert await within(a.snapshot("r", 10)) == (2, [BOB, CAROL])


# --- choosing the store ----------------------------------------------------------


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
