"""Who is in which room: distinct users by id, counted per connection.

`LocalPresence` covers one process. The contract is async so that a shared
store (Redis, with per-worker leases that expire after `PRESENCE_TTL`) can
take its place for several workers.
"""

from __future__ import annotations

from typing import Protocol
from urllib.parse import urlparse

from .envelopes import User
from .settings import Settings


class PresenceStore(Protocol):
    async def start(self) -> None:
        """Connect and begin whatever keeps this worker's entries alive (before any `add`)."""
        ...

    async def stop(self) -> None:
        """Withdraw this worker's entries and disconnect (after the last `remove`)."""
        ...

    async def add(self, room: str, user: User) -> bool:
        """Count one more connection of `user` in `room`; True when it is the first."""
        ...

    async def remove(self, room: str, user: User) -> bool:
        """Count one connection less; True when it was the last."""
        ...

    async def snapshot(self, room: str, limit: int) -> tuple[int, list[User]]:
        """The number of distinct users and at most `limit` of them."""
        ...

    async def workers(self) -> int:
        """How many live workers share this store (this one included)."""
        ...


class LocalPresence:
    def __init__(self) -> None:
        self._rooms: dict[str, dict[str, tuple[User, int]]] = {}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def add(self, room: str, user: User) -> bool:
        users = self._rooms.setdefault(room, {})
        seen = users.get(user.id)
        users[user.id] = (user, 1 if seen is None else seen[1] + 1)
        return seen is None

    async def remove(self, room: str, user: User) -> bool:
        users = self._rooms.get(room)
        seen = users.get(user.id) if users else None
        if users is None or seen is None:
            return False
        if seen[1] > 1:
            users[user.id] = (seen[0], seen[1] - 1)
            return False
        del users[user.id]
        if not users:
            del self._rooms[room]
        return True

    async def snapshot(self, room: str, limit: int) -> tuple[int, list[User]]:
        users = self._rooms.get(room, {})
        listed = [user for user, _ in users.values()][:limit] if limit else []
        return len(users), listed

    async def workers(self) -> int:
        return 1

    def __len__(self) -> int:
        return len(self._rooms)


def open_presence(settings: Settings) -> PresenceStore:
    """Presence in Redis when several processes share rooms and a Redis is at hand
    (the broadcast backend or the history store), else in PostgreSQL when one is,
    else this process's."""
    if settings.shares_rooms_across_processes:
        urls = (settings.broadcast_url, settings.history_url)
        for url in urls:
            if urlparse(url).scheme in ("redis", "rediss"):
                from .presence_redis import RedisPresence

                return RedisPresence(url, settings.presence_ttl)
        for url in urls:
            if urlparse(url).scheme in ("postgres", "postgresql"):
                from .presence_postgres import PostgresPresence

                return PostgresPresence(url, settings.presence_ttl)
    return LocalPresence()
