"""History in a SQLite file: durable across restarts of one process.

Every sqlite3 call runs on one dedicated thread that owns the one connection,
so the event loop never blocks on the disk and appends are serialized:
offsets come out in call order, as with `MemoryStore`. The epoch is kept in
the file, so a restarted server keeps it and its clients recover; a new file
(the old one deleted) starts a new epoch.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from .history import Appended, Build, Page
from .settings import SettingsError, safe_url

T = TypeVar("T")

_MAX_OFFSET = 2**53  # client offsets are unbounded; above any top they mean the same

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rooms (room TEXT PRIMARY KEY, top INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    room TEXT NOT NULL,
    offset INTEGER NOT NULL,
    ts REAL NOT NULL,
    data TEXT NOT NULL,
    dedupe TEXT,
    PRIMARY KEY (room, offset)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS messages_dedupe ON messages (room, dedupe)
    WHERE dedupe IS NOT NULL;
"""


def sqlite_path(url: str) -> str:
    """`sqlite:///roomcast.db` is relative, `sqlite:////var/lib/roomcast.db` absolute."""
    prefix = "sqlite:///"
    path = url[len(prefix) :].partition("?")[0] if url.startswith(prefix) else ""
    if not path:
        raise SettingsError(
            f"HISTORY_URL={safe_url(url)!r} is invalid: give a file, e.g. sqlite:///roomcast.db "
            "(relative) or sqlite:////var/lib/roomcast.db (absolute)."
        )
    return path


class SqliteStore:
    def __init__(
        self, url: str, size: int, ttl: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = sqlite_path(url)
        self.size = size
        self.ttl = ttl
        # Wall-clock time: stamps must mean the same after a restart.
        self.clock = clock
        self.epoch = ""
        self._db: sqlite3.Connection | None = None
        self._thread: ThreadPoolExecutor | None = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        assert self._thread is not None and self._db is not None, "SqliteStore is not connected"
        db = self._db
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, db)

    async def connect(self) -> None:
        if self._thread is not None:
            return
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="roomcast-sqlite")
        loop = asyncio.get_running_loop()
        try:
            self._db, self.epoch = await loop.run_in_executor(self._thread, self._open)
        except BaseException:
            self._thread.shutdown(wait=False)
            self._thread = None
            raise

    def _open(self) -> tuple[sqlite3.Connection, str]:
        # Created in the store's thread and only ever used there.
        db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)  # idempotent, one statement at a time
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?)",
                    (secrets.token_hex(6),),
                )
                (epoch,) = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        except BaseException:
            db.close()
            raise
        return db, str(epoch)

    async def disconnect(self) -> None:
        if self._thread is None:
            return
        if self._db is not None:
            await self._run(lambda db: db.close())
        self._thread.shutdown(wait=True)
        self._thread = None
        self._db = None

    # --- in the store's thread -------------------------------------------

    def _first(self, db: sqlite3.Connection, room: str, top: int) -> int:
        """The oldest retained offset (top + 1 if none): the last `size`
        messages, from the first one younger than the TTL on (as `MemoryStore`
        trims from the head)."""
        (first,) = db.execute(
            "SELECT min(offset) FROM messages WHERE room = ? AND offset > ? AND ts >= ?",
            (room, top - self.size, self.clock() - self.ttl),
        ).fetchone()
        return top + 1 if first is None else int(first)

    def _top(self, db: sqlite3.Connection, room: str) -> int:
        row = db.execute("SELECT top FROM rooms WHERE room = ?", (room,)).fetchone()
        return 0 if row is None else int(row[0])

    def _append(
        self, db: sqlite3.Connection, room: str, build: Build, dedupe: str | None
    ) -> Appended:
        with db:
            db.execute("BEGIN IMMEDIATE")
            top = self._top(db, room)
            db.execute(
                "DELETE FROM messages WHERE room = ? AND offset < ?",
                (room, self._first(db, room, top)),
            )
            if dedupe is not None:
                seen = db.execute(
                    "SELECT offset, data FROM messages WHERE room = ? AND dedupe = ?",
                    (room, dedupe),
                ).fetchone()
                if seen is not None:
                    return Appended(self.epoch, int(seen[0]), str(seen[1]), duplicate=True)
            top += 1
            data = build(self.epoch, top)
            db.execute(
                "INSERT INTO rooms (room, top) VALUES (?, ?) "
                "ON CONFLICT (room) DO UPDATE SET top = excluded.top",
                (room, top),
            )
            db.execute(
                "INSERT INTO messages (room, offset, ts, data, dedupe) VALUES (?, ?, ?, ?, ?)",
                (room, top, self.clock(), data, dedupe),
            )
            db.execute(
                "DELETE FROM messages WHERE room = ? AND offset <= ?", (room, top - self.size)
            )
        return Appended(self.epoch, top, data, duplicate=False)

    def _read(self, db: sqlite3.Connection, room: str, offset: int | None, count: int) -> Page:
        with db:
            db.execute("BEGIN")  # one snapshot for top and entries
            top = self._top(db, room)
            if top == 0:
                return Page(self.epoch, 0, [], complete=offset in (None, 0))
            first = self._first(db, room, top)
            start = max(first, offset + 1) if offset is not None else max(first, top - count + 1)
            rows = db.execute(
                "SELECT data FROM messages WHERE room = ? AND offset >= ? ORDER BY offset",
                (room, start),
            ).fetchall()
        complete = offset is None or first <= offset + 1
        return Page(self.epoch, top, [str(data) for (data,) in rows], complete)

    # --- the contract ----------------------------------------------------

    async def append(self, room: str, build: Build, dedupe: str | None = None) -> Appended:
        return await self._run(lambda db: self._append(db, room, build, dedupe))

    async def since(self, room: str, offset: int) -> Page:
        offset = min(max(offset, -1), _MAX_OFFSET)
        return await self._run(lambda db: self._read(db, room, offset, 0))

    async def last(self, room: str, count: int) -> Page:
        count = min(count, self.size)
        if count <= 0:
            return await self._run(lambda db: Page(self.epoch, self._top(db, room), []))
        return await self._run(lambda db: self._read(db, room, None, count))
