"""What the shared presence stores (Redis, Postgres) have in common.

Each worker holds a lease renewed every `ttl / 3` and keeps its own counts in
memory (`_mine`), so that whenever the shared copy may be wrong (a lost
lease, a call that failed or was cancelled half-way) it can be rewritten:
`_trouble()` wakes the keep-alive task, whose `_refresh()` resyncs while the
gate holds new add/remove calls off. `add`, `remove` and the resync are
written here once; a store supplies the storage steps (`_store_add`,
`_store_remove`, `_rewrite`, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from typing import Any

from ...protocol.envelopes import User
from ...tasks import stop_if_cancelled

log = logging.getLogger("roomcast.presence")


class LeasedPresence(ABC):
    def __init__(self, ttl: float) -> None:
        self.ttl = float(ttl)
        self.worker = ""
        self._task: asyncio.Task[None] | None = None
        # This worker's own connections: room -> user id -> (latest user, count).
        self._mine: dict[str, dict[str, tuple[User, int]]] = {}
        self._dirty = False  # the shared copy may differ from `_mine`: resync
        self._wake = asyncio.Event()
        # A resync closes the gate and waits until no add/remove is in flight.
        self._gate = asyncio.Event()
        self._gate.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._inflight = 0

    def __len__(self) -> int:
        """Rooms where this worker counts connections."""
        return len(self._mine)

    # --- the storage steps of a store -------------------------------------

    @abstractmethod
    def _started(self) -> bool:
        """Whether start() has connected (and stop() has not withdrawn yet)."""

    @abstractmethod
    async def _store_add(self, room: str, user: User) -> tuple[bool, bool]:
        """Count one more connection in the store: (first in the room, lease was lost)."""

    @abstractmethod
    async def _store_remove(self, room: str, user: User) -> tuple[bool, bool, bool]:
        """Count one connection less: (it was counted, it was the last, lease was lost)."""

    @abstractmethod
    async def _refresh(self) -> None:
        """Renew the lease; `_resync()` when it was lost or `_dirty`."""

    @abstractmethod
    async def _rewrite(self) -> None:
        """Take the lease back if lost, and make the store's entries of this worker `_mine`."""

    @abstractmethod
    def _detach(self) -> object | None:
        """Hand over the store's connection (None if not started) and forget it."""

    @abstractmethod
    async def _withdraw(self, handle: Any) -> None:
        """Delete this worker's entries and its lease."""

    @abstractmethod
    async def _disconnect(self, handle: Any) -> None: ...

    # --- the contract ----------------------------------------------------

    @abstractmethod
    async def start(self) -> None:
        """Connect, take this worker's lease and start the keep-alive."""

    @abstractmethod
    async def snapshot(self, room: str, limit: int) -> tuple[int, list[User]]: ...

    @abstractmethod
    async def workers(self) -> int: ...

    async def add(self, room: str, user: User) -> bool:
        if not self._started():
            raise ConnectionError("presence is not started (or already stopped)")
        await self._enter()
        try:
            first, lost = await self._store_add(room, user)
            self._remember(room, user)
        except BaseException:
            self._trouble()  # it may have been counted: the store may count one too many
            raise
        finally:
            self._leave()
        if lost:
            self._trouble()
        return first

    async def remove(self, room: str, user: User) -> bool:
        if not self._started():
            return False  # stopped: this worker's entries are withdrawn already
        try:
            await self._enter()
        except BaseException:
            self._forget(room, user.id)  # the connection is gone all the same
            self._trouble()
            raise
        try:
            mine = self._forget(room, user.id)
            counted, last, lost = await self._store_remove(room, user)
        except BaseException:
            self._trouble()
            raise
        finally:
            self._leave()
        if lost or counted != mine:
            self._trouble()
        return last

    async def _resync(self) -> None:
        """Rewrite this worker's entries from `_mine`, with add/remove held off."""
        self._gate.clear()
        try:
            await self._idle.wait()
            self._dirty = False
            await self._rewrite()
        except BaseException:
            self._dirty = True
            raise
        finally:
            self._gate.set()

    async def stop(self) -> None:
        """Withdraw every entry of this worker and its lease, then disconnect."""
        await self._stop_keep_alive()
        handle = self._detach()
        if handle is None:
            return
        try:
            async with asyncio.timeout(max(self.ttl, 10.0)):
                await self._withdraw(handle)
        except Exception as exc:  # the lease expires by itself, and the entries with it
            log.warning("presence of worker %s not withdrawn: %r", self.worker, exc)
        finally:
            self._mine.clear()
            await self._disconnect(handle)

    def _remember(self, room: str, user: User) -> None:
        users = self._mine.setdefault(room, {})
        seen = users.get(user.id)
        users[user.id] = (user, 1 if seen is None else seen[1] + 1)

    def _forget(self, room: str, user_id: str) -> bool:
        """One connection less in `_mine`; whether there was one."""
        users = self._mine.get(room)
        seen = users.get(user_id) if users else None
        if users is None or seen is None:
            return False
        if seen[1] > 1:
            users[user_id] = (seen[0], seen[1] - 1)
        else:
            del users[user_id]
            if not users:
                del self._mine[room]
        return True

    def _trouble(self) -> None:
        self._dirty = True
        self._wake.set()

    async def _enter(self) -> None:
        while not self._gate.is_set():
            await self._gate.wait()
        self._inflight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._inflight -= 1
        if not self._inflight:
            self._idle.set()

    def _start_keep_alive(self) -> None:
        self._dirty = False
        self._task = asyncio.create_task(self._keep_alive(), name="presence-keep-alive")

    async def _stop_keep_alive(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _keep_alive(self) -> None:
        while True:
            stop_if_cancelled()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.ttl / 3):
                    await self._wake.wait()
            self._wake.clear()
            try:
                async with asyncio.timeout(max(self.ttl, 5.0)):
                    await self._refresh()
            except Exception as exc:
                log.warning("presence of worker %s not renewed: %r", self.worker, exc)
