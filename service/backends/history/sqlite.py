"""History in a SQLite file: durable across restarts of one process.

Every sqlite3 call runs on one dedicated thread that owns the one connection,
so the event loop never blocks on the disk and appends are serialized:
offsets come out in call order, as with `MemoryStore`. The epoch is kept in
the file, so a restarted server keeps it and its clients recover; a new file
(the old one deleted) starts a new epoch.

Group commit: appends that arrive while a batch is being written wait and go
together in the next one, one transaction and one thread hop for all of them.
An append still returns only once its transaction is committed.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Final, TypeVar

from ...errors import SettingsError
from ..urls import safe_url
from .base import Appended, Build, Page

T = TypeVar("T")

_MAX_OFFSET = 2**53  # client offsets are unbounded; above any top they mean the same
MAX_BATCH: Final = 256  # appends per transaction at most


@dataclass(slots=True)
class _Pending:
    room: str
    build: Build
    dedupe: str | None
    done: asyncio.Future[Appended]


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


def _switch_to_wal(db: sqlite3.Connection, attempts: int = 100) -> None:
    """Switching to WAL takes an exclusive lock without waiting for the busy
    timeout: connections opening the same new file together retry (in the
    store's thread, never the event loop's)."""
    for attempt in range(attempts):
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.02)


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
        self._pending: list[_Pending] = []
        self._writer: asyncio.Task[None] | None = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._thread is None or self._db is None:
            raise ConnectionError("the SQLite history store is not connected")
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
            _switch_to_wal(db)
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

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

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
        self,
        db: sqlite3.Connection,
        tops: dict[str, int],
        room: str,
        build: Build,
        dedupe: str | None,
    ) -> Appended:
        """One append inside the batch's transaction; `tops` holds the rooms' tops so far."""
        top = tops.get(room)
        if top is None:
            top = tops[room] = self._top(db, room)
        if dedupe is not None:
            seen = db.execute(
                "SELECT offset, data FROM messages WHERE room = ? AND dedupe = ?",
                (room, dedupe),
            ).fetchone()
            if seen is not None and int(seen[0]) >= self._first(db, room, top):
                return Appended(self.epoch, int(seen[0]), str(seen[1]), duplicate=True)
            if seen is not None:  # trimmed, not yet deleted: forget its key
                db.execute("DELETE FROM messages WHERE room = ? AND dedupe = ?", (room, dedupe))
        data = build(self.epoch, top + 1)
        db.execute(
            "INSERT INTO messages (room, offset, ts, data, dedupe) VALUES (?, ?, ?, ?, ?)",
            (room, top + 1, self.clock(), data, dedupe),
        )
        tops[room] = top + 1
        return Appended(self.epoch, top + 1, data, duplicate=False)

    def _append_batch(
        self, db: sqlite3.Connection, batch: list[_Pending]
    ) -> list[Appended | BaseException]:
        """Every append of `batch` in one transaction, then each room's top and trim
        once. A build that fails fails its append alone (it writes nothing)."""
        results: list[Appended | BaseException] = []
        tops: dict[str, int] = {}
        with db:
            db.execute("BEGIN IMMEDIATE")
            for item in batch:
                try:
                    results.append(self._append(db, tops, item.room, item.build, item.dedupe))
                except sqlite3.Error:
                    raise  # the transaction is in doubt: every append of the batch fails
                except Exception as exc:  # the build failed, before anything was written
                    results.append(exc)
            for room, top in tops.items():
                db.execute(
                    "INSERT INTO rooms (room, top) VALUES (?, ?) "
                    "ON CONFLICT (room) DO UPDATE SET top = excluded.top",
                    (room, top),
                )
                db.execute(
                    "DELETE FROM messages WHERE room = ? AND offset < ?",
                    (room, self._first(db, room, top)),
                )
        return results

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
        done: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(room, build, dedupe, done))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_batches(), name="roomcast-sqlite")
        return await done

    async def _write_batches(self) -> None:
        """Write what is pending, batch after batch, until nothing is."""
        try:
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                try:
                    results = await self._run(partial(self._append_batch, batch=batch))
                except BaseException as exc:  # the transaction failed: every append did
                    for item in batch:
                        if not item.done.done():
                            item.done.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for item, result in zip(batch, results, strict=True):
                    if item.done.done():
                        continue  # its caller went away (cancelled): stored all the same
                    if isinstance(result, BaseException):
                        item.done.set_exception(result)
                    else:
                        item.done.set_result(result)
        finally:
            self._writer = None
            for item in self._pending:  # only when cancelled: nobody writes them now
                if not item.done.done():
                    item.done.set_exception(ConnectionError("the SQLite store stopped writing"))
            self._pending = []

    async def since(self, room: str, offset: int) -> Page:
        offset = min(max(offset, -1), _MAX_OFFSET)
        return await self._run(lambda db: self._read(db, room, offset, 0))

    async def last(self, room: str, count: int) -> Page:
        count = min(count, self.size)
        if count <= 0:
            return await self._run(lambda db: Page(self.epoch, self._top(db, room), []))
        return await self._run(lambda db: self._read(db, room, None, count))
