"""The history store `HISTORY_URL` names, its driver imported only when used."""

from __future__ import annotations

from ...errors import SettingsError
from ..urls import POSTGRES, REDIS, missing_driver, safe_url, scheme_of
from .base import HistoryStore


def open_store(url: str, size: int, ttl: float, memory_mb: int) -> HistoryStore:
    """The store for `url`, keeping `size` messages per room for `ttl` seconds; the
    in-process store (`memory://`) holds at most `memory_mb` MiB across rooms.

    Nothing connects yet: `connect()` does, in the lifespan.
    """
    scheme = scheme_of(url)
    if scheme == "memory":
        from .memory import MemoryStore

        return MemoryStore(size, ttl, memory_mb * 2**20)
    if scheme == "sqlite":
        from .sqlite import SqliteStore

        return SqliteStore(url, size, ttl)
    if scheme in REDIS:
        try:
            from .redis import RedisStore
        except ImportError as exc:
            raise missing_driver("HISTORY_URL", url, "redis", "redis", exc) from None
        return RedisStore(url, size, ttl)
    if scheme in POSTGRES:
        try:
            from .postgres import PostgresStore
        except ImportError as exc:
            raise missing_driver("HISTORY_URL", url, "asyncpg", "postgres", exc) from None
        return PostgresStore(url, size, ttl)
    raise SettingsError(
        f"HISTORY_URL={safe_url(url)!r} is invalid: the scheme must be one of "
        "memory://, sqlite:///, redis://, rediss://, postgres://, postgresql://."
    )
