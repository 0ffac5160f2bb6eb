"""The presence contract: who is in which room, distinct users by id, counted per connection.

`LocalPresence` covers one process. The contract is async so that a shared
store (Redis or Postgres, with per-worker leases that expire after
`PRESENCE_TTL`) can take its place for several workers.
"""

from __future__ import annotations

from typing import Protocol

from ...protocol.envelopes import User


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
