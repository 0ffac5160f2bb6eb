"""What keeps a client's connection alive: the heartbeat, and fresh tokens."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from websockets.exceptions import ConnectionClosed

from ..protocol.codec import encode
from ..protocol.envelopes import Ping, Refresh
from .dial import Socket
from .events import Unauthorized
from .rules import refresh_margin, token_expiry

log = logging.getLogger("roomcast.client")

TokenRefresh = Callable[[], Awaitable[str]]


class Heartbeat:
    """After `interval` seconds of silence send `ping`; without an answer within another
    `interval`, the connection is lost: drop it (the client then reconnects)."""

    def __init__(self) -> None:
        self.last_heard = 0.0
        self.pings_sent = 0  # heartbeat pings, and the pongs that answered them
        self.pongs_received = 0
        self._refs: set[str] = set()

    def heard(self) -> None:
        self.last_heard = asyncio.get_running_loop().time()

    def answered(self, ref: str | None) -> bool:
        """Whether a `pong` with this `ref` answers one of our pings (it is then consumed)."""
        if ref not in self._refs:
            return False
        self._refs.discard(ref)
        self.pongs_received += 1
        return True

    async def run(self, ws: Socket, interval: float, busy: Callable[[], bool]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if busy():  # the reader waits for the caller, not the server
                self.last_heard = loop.time()
            silent = loop.time() - self.last_heard
            if silent < interval:
                await asyncio.sleep(interval - silent)
                continue
            ref = "hb-" + uuid.uuid4().hex
            self._refs.add(ref)
            asked = loop.time()
            self.pings_sent += 1
            with contextlib.suppress(ConnectionClosed):
                await ws.send(encode(Ping(ref=ref)))
            await asyncio.sleep(interval)
            if self.last_heard < asked:
                log.info("no answer within %ss of a ping: the connection is lost", interval)
                ws.transport.abort()
                return


class Tokens:
    """The connection's token, and the callback that gets a new one before `exp`."""

    def __init__(self, token: str | None, refresh: TokenRefresh | None, timeout: float) -> None:
        self.token = token
        self.refresh_with = refresh
        self.timeout = timeout

    def due(self) -> bool:
        if self.token is None or self.refresh_with is None:
            return False
        exp = token_expiry(self.token)
        return exp is not None and exp - time.time() < refresh_margin(exp - time.time())

    async def refresh(self) -> None:
        if self.refresh_with is None:
            raise Unauthorized("unauthorized", "the token was refused and no token_refresh is set")
        try:
            async with asyncio.timeout(self.timeout):
                self.token = await self.refresh_with()
        except Exception as exc:
            raise Unauthorized("unauthorized", f"token_refresh failed: {exc!r}") from None

    async def keep_fresh(self, ws: Socket) -> None:
        """Before the token's `exp`, get a new one and send `refresh` on this connection."""
        while self.token is not None and self.refresh_with is not None:
            exp = token_expiry(self.token)
            if exp is None:
                return
            left = exp - time.time()
            await asyncio.sleep(max(0.0, left - refresh_margin(left)))
            try:
                await self.refresh()
            except Unauthorized as exc:
                log.warning("%s: the connection ends at the token's exp", exc.detail)
                return
            new_exp = token_expiry(self.token)
            if new_exp is None or new_exp <= exp:
                log.warning("token_refresh gave no later `exp`: not refreshing again")
                return
            with contextlib.suppress(ConnectionClosed):
                await ws.send(encode(Refresh(token=self.token, ref=uuid.uuid4().hex)))
