"""The history-store contract, run over every store against real servers.

`MemoryStore` is the reference; SQLite, Redis and PostgreSQL must behave the
same: gapless offsets from 1, encode once with the real epoch and offset,
dedupe within retention, trimming by size and TTL, and an epoch that changes
only when the history is lost.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from roomcast.backends.history.base import Appended, Build, HistoryStore, Page, recovered
from roomcast.backends.history.factory import open_store
from roomcast.backends.history.memory import MemoryStore
from roomcast.errors import SettingsError
from roomcast.protocol.codec import encode, server_decoder
from roomcast.protocol.envelopes import Chat, Notification, User, now
from roomcast.settings import Settings

from ..brokers import fresh_database
from ..waiting import eventually, within

USER = User("u1", "Ada")
STORES = ["memory", "sqlite", "redis", "postgres"]


def chat(room: str, text: str = "hi", calls: list[tuple[str, int]] | None = None) -> Build:
    def build(epoch: str, offset: int) -> str:
        if calls is not None:
            calls.append((epoch, offset))
        return encode(Chat(room, epoch, offset, USER, text, now()))

    return build


def offsets(page: Page) -> list[int]:
    found: list[int] = []
    for data in page.entries:
        stored = server_decoder.decode(data)
        # A history holds chats and a room's notifications, which always have an offset.
        assert isinstance(stored, Chat | Notification) and stored.offset is not None, stored
        found.append(stored.offset)
    return found


@dataclass
class Backend:
    """One kind of store: open as many as a test needs, all on the same data."""

    name: str
    url: str
    lose: Callable[[Backend], Awaitable[None]]
    stores: list[HistoryStore] = field(default_factory=list)

    async def open(self, size: int = 100, ttl: int = 3600) -> HistoryStore:
        settings = Settings(history_url=self.url, history_size=size, history_ttl=ttl, outbox_size=1)
        store = open_store(
            settings.history_url,
            settings.history_size,
            settings.history_ttl,
            settings.history_memory_mb,
        )
        await within(store.connect())
        self.stores.append(store)
        return store

    async def close_all(self) -> None:
        while self.stores:
            await within(self.stores.pop().disconnect())


async def _lose_memory(backend: Backend) -> None:
    pass  # a new MemoryStore is a new history


def _delete_database(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


async def _lose_sqlite(backend: Backend) -> None:
    await backend.close_all()
    _delete_database(backend.url.removeprefix("sqlite:///"))


async def _lose_redis(backend: Backend) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(backend.url.partition("?")[0])
    try:
        await within(client.flushall())
    finally:
        await within(client.aclose())


async def _lose_postgres(backend: Backend) -> None:
    import asyncpg

    await backend.close_all()
    conn = await within(asyncpg.connect(backend.url))
    try:
        await within(conn.execute("DROP TABLE roomcast_messages, roomcast_rooms, roomcast_meta"))
    finally:
        await within(conn.close())


@pytest.fixture(params=STORES)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    name: str = request.param
    if name == "memory":
        b = Backend(name, "memory://", _lose_memory)
    elif name == "sqlite":
        b = Backend(name, f"sqlite:///{tmp_path / 'history.db'}", _lose_sqlite)
    elif name == "redis":
        url = request.getfixturevalue("redis_url")
        b = Backend(name, f"{url}?prefix=t{secrets.token_hex(4)}", _lose_redis)
    else:
        url = await within(fresh_database(request.getfixturevalue("postgres_url")), 30)
        b = Backend(name, url, _lose_postgres)
    yield b
    await b.close_all()


# --- the contract --------------------------------------------------------------


async def test_ping_answers_while_connected_and_fails_after(backend: Backend) -> None:
    store = await backend.open()
    await within(store.ping())  # the admin's probe of the store
    await within(store.disconnect())
    backend.stores.remove(store)
    if backend.name != "memory":  # nothing to lose in process
        with pytest.raises(ConnectionError):
            await within(store.ping())


async def test_offsets_start_at_one_without_gaps(backend: Backend) -> None:
    store = await backend.open()
    first = [await within(store.append("a", chat("a"))) for _ in range(5)]
    other = await within(store.append("b", chat("b")))

    assert [a.offset for a in first] == [1, 2, 3, 4, 5]
    assert not any(a.duplicate for a in first)
    assert len({a.epoch for a in first}) == 1  # the room's epoch (Redis: one per room)
    assert other.offset == 1
    page = await within(store.since("a", 0))
    assert (page.epoch, page.top, page.complete) == (first[0].epoch, 5, True)
    assert page.entries == [a.data for a in first]
    assert offsets(await within(store.since("a", 3))) == [4, 5]


async def test_build_is_called_once_and_stored_data_has_real_epoch_and_offset(
    backend: Backend,
) -> None:
    store = await backend.open()
    calls: list[tuple[str, int]] = []
    # User content that looks like the fields, in a string and as JSON data.
    tricky = '"epoch":"~epoch~","offset":9007199254740993 \\" \x00 ✓'
    appended = [await within(store.append("r", chat("r", tricky, calls))) for _ in range(3)]

    def note(epoch: str, offset: int) -> str:
        calls.append((epoch, offset))
        fake = {"epoch": "~epoch~", "offset": 9007199254740993, "text": tricky}
        return encode(
            Notification(room="r", epoch=epoch, offset=offset, title="t", body=tricky,
                         data=fake, ts=now())
        )  # fmt: skip

    appended.append(await within(store.append("r", note)))

    assert len(calls) == 4
    for n, a in enumerate(appended, 1):
        envelope: Any = server_decoder.decode(a.data)
        assert (envelope.epoch, envelope.offset) == (a.epoch, a.offset) == (a.epoch, n)
    assert [server_decoder.decode(a.data).text for a in appended[:3]] == [tricky] * 3  # type: ignore[union-attr]
    last: Any = server_decoder.decode(appended[3].data)
    assert last.data == {"epoch": "~epoch~", "offset": 9007199254740993, "text": tricky}
    assert last.body == tricky
    page = await within(store.since("r", 0))
    assert page.entries == [a.data for a in appended]
    if backend.name != "redis":  # Redis builds with placeholders and splices the values in
        assert calls == [(appended[0].epoch, n) for n in range(1, 5)]


async def test_concurrent_appends_get_every_offset_once(backend: Backend) -> None:
    store = await backend.open(size=1000)
    rooms = [f"room-{i}" for i in range(4)]
    order = [rooms[i % 4] for i in range(200)]
    calls: list[tuple[str, int]] = []
    results = await within(
        asyncio.gather(
            *(store.append(room, chat(room, f"m{i}", calls)) for i, room in enumerate(order))
        ),
        30,
    )
    assert len(calls) == 200
    for room in rooms:
        mine = [a for a, r in zip(results, order, strict=True) if r == room]
        assert sorted(a.offset for a in mine) == list(range(1, 51))
        if backend.name in ("memory", "sqlite"):  # one process, serialized: call order
            assert [a.offset for a in mine] == list(range(1, 51))
        page = await within(store.since(room, 0))
        assert (page.top, page.complete) == (50, True)
        assert offsets(page) == list(range(1, 51))
        by_offset = {a.offset: a.data for a in mine}
        assert page.entries == [by_offset[n] for n in range(1, 51)]


async def test_dedupe_returns_the_first_and_stores_nothing(backend: Backend) -> None:
    store = await backend.open()
    key = "u1\x00ref-1"  # the hub's keys hold a NUL
    first = await within(store.append("r", chat("r", "one"), key))
    await within(store.append("r", chat("r", "two")))
    calls: list[tuple[str, int]] = []
    again = await within(store.append("r", chat("r", "one again", calls), key))
    elsewhere = await within(store.append("other", chat("other", "x"), key))

    assert not first.duplicate and first.offset == 1
    assert again == Appended(first.epoch, 1, first.data, duplicate=True)
    if backend.name != "redis":  # Redis builds before its script knows
        assert calls == []
    assert (elsewhere.offset, elsewhere.duplicate) == (1, False)
    page = await within(store.since("r", 0))
    assert (page.top, offsets(page)) == (2, [1, 2])
    third = await within(store.append("r", chat("r", "three"), "u1\x00ref-2"))
    assert (third.offset, third.duplicate) == (3, False)


async def test_dedupe_forgets_what_was_trimmed(backend: Backend) -> None:
    store = await backend.open(size=3)
    await within(store.append("r", chat("r"), "k"))
    for _ in range(3):
        await within(store.append("r", chat("r")))
    again = await within(store.append("r", chat("r"), "k"))
    assert (again.offset, again.duplicate) == (5, False)
    # The oldest retained one still counts.
    assert (await within(store.append("r", chat("r"), "k"))).duplicate


async def test_size_trim(backend: Backend) -> None:
    store = await backend.open(size=5)
    epoch = ""
    for _ in range(12):
        epoch = (await within(store.append("r", chat("r")))).epoch

    whole = await within(store.since("r", 0))
    assert (whole.top, whole.complete, offsets(whole)) == (12, False, [8, 9, 10, 11, 12])
    assert not recovered(epoch, 0, whole)
    at7 = await within(store.since("r", 7))
    assert (at7.complete, offsets(at7)) == (True, [8, 9, 10, 11, 12])
    assert recovered(epoch, 7, at7)
    at6 = await within(store.since("r", 6))
    assert not at6.complete and not recovered(epoch, 6, at6)
    assert offsets(await within(store.last("r", 3))) == [10, 11, 12]
    assert offsets(await within(store.last("r", 100))) == [8, 9, 10, 11, 12]
    none = await within(store.last("r", 0))
    assert (none.top, none.entries) == (12, [])


async def test_ttl_trim(backend: Backend) -> None:
    store = await backend.open(size=100, ttl=1)
    epoch = (await within(store.append("r", chat("r"), "k"))).epoch
    for _ in range(3):
        await within(store.append("r", chat("r")))
    assert (await within(store.append("r", chat("r"), "k"))).duplicate
    assert offsets(await within(store.since("r", 0))) == [1, 2, 3, 4]

    started = time.monotonic()
    page = await eventually(lambda: store.since("r", 0), lambda p: not p.entries)
    assert time.monotonic() - started < 5
    assert (page.epoch, page.top, page.complete) == (epoch, 4, False)
    assert not recovered(epoch, 0, page)
    # A client that had everything still recovers: nothing it lacks was lost.
    caught_up = await within(store.since("r", page.top))
    assert caught_up.complete and recovered(epoch, page.top, caught_up)
    assert (await within(store.last("r", 10))).entries == []
    # The expired dedupe key is forgotten; offsets go on.
    again = await within(store.append("r", chat("r"), "k"))
    assert (again.offset, again.duplicate, again.epoch) == (page.top + 1, False, epoch)
    fresh = await within(store.since("r", page.top))
    assert (fresh.complete, offsets(fresh)) == (True, [page.top + 1])


async def test_since_beyond_top(backend: Backend) -> None:
    store = await backend.open()
    epoch = ""
    for _ in range(3):
        epoch = (await within(store.append("r", chat("r")))).epoch
    ahead = await within(store.since("r", 5))
    assert (ahead.top, ahead.entries) == (3, [])
    assert not recovered(epoch, 5, ahead)
    level = await within(store.since("r", 3))
    assert (level.top, level.entries, level.complete) == (3, [], True)
    assert recovered(epoch, 3, level)
    # Offsets and counts from clients are unbounded ints.
    huge = await within(store.since("r", 10**30))
    assert (huge.top, huge.entries) == (3, []) and not recovered(epoch, 10**30, huge)
    assert offsets(await within(store.last("r", 10**30))) == [1, 2, 3]
    assert (await within(store.since("nobody", 10**30))).top == 0


async def test_unknown_room(backend: Backend) -> None:
    store = await backend.open()
    empty = await within(store.since("nobody", 0))
    assert (empty.top, empty.entries, empty.complete) == (0, [], True)
    assert recovered(empty.epoch, 0, empty)
    ahead = await within(store.since("nobody", 4))
    assert (ahead.top, ahead.complete) == (0, False)
    assert not recovered(empty.epoch, 4, ahead)
    tail = await within(store.last("nobody", 10))
    assert (tail.top, tail.entries, tail.epoch) == (0, [], empty.epoch)
    # A client that joined the empty room recovers once it is written to.
    appended = await within(store.append("nobody", chat("nobody")))
    assert appended.epoch == empty.epoch
    assert recovered(empty.epoch, 0, await within(store.since("nobody", 0)))


async def test_epoch_across_reconnect(backend: Backend) -> None:
    store = await backend.open()
    before = [await within(store.append("r", chat("r"))) for _ in range(3)]
    await backend.close_all()

    reopened = await backend.open()
    page = await within(reopened.since("r", 0))
    after = await within(reopened.append("r", chat("r")))
    if backend.name == "memory":  # the history lived in the old object
        assert page.epoch != before[0].epoch and page.top == 0 and after.offset == 1
    else:
        assert (page.epoch, page.entries) == (before[0].epoch, [a.data for a in before])
        assert (after.epoch, after.offset) == (before[0].epoch, 4)
        assert recovered(before[0].epoch, 3, await within(reopened.since("r", 3)))


async def test_epoch_changes_when_history_is_lost(backend: Backend) -> None:
    store = await backend.open()
    before = [await within(store.append("r", chat("r"))) for _ in range(2)]
    await backend.lose(backend)
    if backend.name != "redis":  # Redis notices by itself, on the same connection
        store = await backend.open()

    page = await within(store.since("r", 2))
    assert page.epoch != before[0].epoch and page.top == 0
    assert not recovered(before[0].epoch, 2, page)
    appended = await within(store.append("r", chat("r")))
    assert (appended.offset, appended.epoch) == (1, page.epoch)


@pytest.mark.parametrize("backend", ["sqlite", "redis", "postgres"], indirect=True)
async def test_stores_on_the_same_data_share_offsets(backend: Backend) -> None:
    """Workers: several store objects on one database never hand out an offset twice."""
    stores = await within(asyncio.gather(*(backend.open() for _ in range(3))), 30)
    results = await within(
        asyncio.gather(*(stores[i % 3].append("r", chat("r", f"m{i}")) for i in range(90))), 30
    )
    assert sorted(a.offset for a in results) == list(range(1, 91))
    assert len({a.epoch for a in results}) == 1
    for store in stores:
        page = await within(store.since("r", 0))
        assert (page.top, offsets(page)) == (90, list(range(1, 91)))


# --- the recovery rule, pure ---------------------------------------------------


@pytest.mark.parametrize(
    ("epoch", "offset", "page", "expected"),
    [
        ("e1", 3, Page("e1", 5, ["4", "5"], complete=True), True),
        ("e1", 5, Page("e1", 5, [], complete=True), True),  # up to date
        ("e1", 0, Page("e1", 0, [], complete=True), True),  # empty room
        ("e0", 3, Page("e1", 5, ["4", "5"], complete=True), False),  # history lost
        ("e1", 6, Page("e1", 5, [], complete=True), False),  # ahead of the room
        ("e1", 2, Page("e1", 9, ["5"], complete=False), False),  # a gap was trimmed
    ],
)
def test_recovered_rule(epoch: str, offset: int, page: Page, expected: bool) -> None:
    assert recovered(epoch, offset, page) is expected


async def test_memory_store_trims_by_injected_clock() -> None:
    clock = [1000.0]
    store = MemoryStore(10, 60, clock=lambda: clock[0])
    await store.append("r", chat("r"))
    clock[0] += 61
    page = await store.since("r", 0)
    assert (page.top, page.entries, page.complete) == (1, [], False)


# --- choosing a store ----------------------------------------------------------


def open_settings(settings: Settings) -> HistoryStore:
    return open_store(
        settings.history_url,
        settings.history_size,
        settings.history_ttl,
        settings.history_memory_mb,
    )


def _settings(url: str) -> Settings:
    return Settings(history_url=url)


def test_open_store_picks_by_scheme(tmp_path: Path) -> None:
    from roomcast.backends.history.postgres import PostgresStore
    from roomcast.backends.history.redis import RedisStore
    from roomcast.backends.history.sqlite import SqliteStore

    assert isinstance(open_settings(_settings("memory://")), MemoryStore)
    assert isinstance(open_settings(_settings(f"sqlite:///{tmp_path}/h.db")), SqliteStore)
    for url in ("redis://localhost:6379/0", "rediss://localhost/1?prefix=a.b"):
        assert isinstance(open_settings(_settings(url)), RedisStore)
    for url in ("postgres://u@localhost/db", "postgresql://u@localhost/db"):
        assert isinstance(open_settings(_settings(url)), PostgresStore)


@pytest.mark.parametrize(
    ("url", "driver", "extra"),
    [("redis://localhost", "redis", "redis"), ("postgres://localhost/db", "asyncpg", "postgres")],
)
def test_open_store_names_the_missing_extra(
    monkeypatch: pytest.MonkeyPatch, url: str, driver: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, driver, None)  # import fails as if not installed
    for name in (
        "roomcast.backends.history.redis",
        "roomcast.backends.history.postgres",
        "roomcast.backends.pg",
    ):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(SettingsError, match=rf"pip install 'roomcast\[{extra}\]'"):
        open_settings(_settings(url))


def test_redis_url_prefix() -> None:
    from roomcast.backends.history.redis import RedisStore

    store = RedisStore("redis://h:1/2?prefix=app.one&ssl_cert_reqs=none", 10, 60)
    assert (store.url, store.prefix) == ("redis://h:1/2?ssl_cert_reqs=none", "app.one")
    assert RedisStore("redis://h", 10, 60).prefix == "roomcast"
    with pytest.raises(SettingsError, match="prefix"):
        RedisStore("redis://h?prefix={x}", 10, 60)


def test_sqlite_paths() -> None:
    from roomcast.backends.history.sqlite import sqlite_path

    assert sqlite_path("sqlite:///roomcast.db") == "roomcast.db"
    assert sqlite_path("sqlite:////var/lib/roomcast.db") == "/var/lib/roomcast.db"


async def test_a_failing_build_fails_alone(backend: Backend) -> None:
    """One append whose envelope cannot be built (in SQLite: inside a batch of
    concurrent appends sharing one transaction) fails, and only that one."""
    store = await backend.open()

    def broken(epoch: str, offset: int) -> str:
        raise ValueError("cannot build this one")

    calls = [
        store.append("r", broken if i == 7 else chat("r", f"m{i}"), f"d{i}") for i in range(40)
    ]
    results = await within(asyncio.gather(*calls, return_exceptions=True), 30)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == 1 and isinstance(results[7], ValueError), results
    stored = [r for r in results if not isinstance(r, BaseException)]
    assert sorted(a.offset for a in stored) == list(range(1, 40))
    page = await within(store.since("r", 0))
    assert offsets(page) == list(range(1, 40))
    # The failed one's dedupe key was not kept: the same key can be stored now.
    again = await within(store.append("r", chat("r", "m7"), "d7"))
    assert (again.offset, again.duplicate) == (40, False)


async def test_postgres_prefixes_keep_separate_histories(postgres_url: str) -> None:
    """`?prefix=` names the tables: two deployments in one database share nothing."""
    from roomcast.backends.history.postgres import PostgresStore

    def open_postgres(url: str) -> PostgresStore:
        store = open_settings(Settings(history_url=url, outbox_size=1))
        assert isinstance(store, PostgresStore)  # its `epoch` is the whole store's
        return store

    url = await within(fresh_database(postgres_url), 30)
    stores = [open_postgres(f"{url}?prefix={p}") for p in ("blue", "green.2", "blue")]
    for store in stores:
        await within(store.connect())
    try:
        blue, green, blue_too = stores
        assert (await within(blue.append("r", chat("r", "b1")))).offset == 1
        assert (await within(green.append("r", chat("r", "g1")))).offset == 1
        assert (await within(blue_too.append("r", chat("r", "b2")))).offset == 2
        assert offsets(await within(green.since("r", 0))) == [1]
        assert offsets(await within(blue.since("r", 0))) == [1, 2]
        assert blue.epoch == blue_too.epoch != green.epoch
    finally:
        for store in stores:
            await within(store.disconnect())
