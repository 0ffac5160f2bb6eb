"""Presence in this process: one worker."""

from __future__ import annotations

from itertools import islice

from ...protocol.envelopes import User


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
        # The first `limit` only: a join into a room of N must not copy all N users.
        listed = [user for user, _ in islice(users.values(), limit)]
        return len(users), listed

    async def workers(self) -> int:
        return 1

    def __len__(self) -> int:
        return len(self._rooms)
