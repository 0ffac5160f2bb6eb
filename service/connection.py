"""One WebSocket connection: its user, its rooms, its bounded outbox and sender.

Fan-out only ever calls `push()`, which never awaits: a frame goes into the
outbox or, when the outbox is full, the connection is handed to `on_overflow`
(the hub closes it with 4408). The connection's own sender task drains the
outbox, everything queued in one wake-up, so a slow client only ever slows
itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from starlette.types import Send

from .envelopes import Close, User
from .limits import BadFrames, RateLimiter

log = logging.getLogger("roomcast.connection")

# How long the close of a client that does not read may take before the
# connection is dropped at the TCP level.
DROP_TIMEOUT = 10.0


class Replay:
    """Stored messages streamed as the client reads them; not counted in the outbox."""

    __slots__ = ("frames",)

    def __init__(self, frames: list[str]) -> None:
        self.frames = frames


class _CloseAfter:
    __slots__ = ("code",)

    def __init__(self, code: int) -> None:
        self.code = code


class Connection:
    __slots__ = (
        "__weakref__",
        "_abort",
        "_counted",
        "_finished",
        "_queue",
        "_send",
        "_sender",
        "_waiter",
        "bad_frames",
        "closing",
        "id",
        "limit",
        "limiter",
        "on_overflow",
        "rooms",
        "user",
    )

    def __init__(
        self,
        conn_id: str,
        user: User,
        send: Send,
        *,
        limit: int,
        rate: int,
        on_overflow: Callable[[Connection], None],
        abort: Callable[[], None] | None = None,
    ) -> None:
        self.id = conn_id
        self.user = user
        self.rooms: set[str] = set()
        self.limit = limit
        self.limiter = RateLimiter(float(rate))
        self.bad_frames = BadFrames()
        self.closing = False
        self.on_overflow = on_overflow
        self._send = send
        self._abort = abort
        self._queue: deque[Any] = deque()
        self._counted = 0
        self._waiter: asyncio.Future[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._finished: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"<Connection {self.id} user={self.user.id!r} rooms={len(self.rooms)}>"

    # --- queueing (never awaits) -----------------------------------------

    def push(self, text: str) -> bool:
        if self.closing:
            return False
        if self._counted >= self.limit:
            self.closing = True
            self.on_overflow(self)
            return False
        self._queue.append(text)
        self._counted += 1
        self._wake()
        return True

    def push_replay(self, frames: list[str]) -> None:
        if frames and not self.closing:
            self._queue.append(Replay(frames))
            self._wake()

    def close_after_queued(self, code: int) -> None:
        """Send what is queued (the error that explains why), then close."""
        if not self.closing:
            self.closing = True
            self._queue.append(_CloseAfter(code))
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- the sender ------------------------------------------------------

    def start(self) -> None:
        self._sender = asyncio.create_task(self._drain(), name=f"roomcast-send-{self.id}")

    async def _drain(self) -> None:
        send, queue, loop = self._send, self._queue, asyncio.get_running_loop()
        try:
            while True:
                while queue:
                    item = queue.popleft()
                    if type(item) is str:
                        self._counted -= 1
                        await send({"type": "websocket.send", "text": item})
                    elif type(item) is Replay:
                        for frame in item.frames:
                            await send({"type": "websocket.send", "text": frame})
                    else:
                        await send({"type": "websocket.close", "code": item.code})
                        return
                self._waiter = loop.create_future()
                await self._waiter
                self._waiter = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client went away mid-send
            log.debug("sender of %s stopped: %r", self.id, exc)

    async def drop(self, code: int = Close.SLOW_CONSUMER, grace: float = DROP_TIMEOUT) -> None:
        """Close now, without waiting for the queue: for a client that does not read.

        The close frame can only be written once the client reads again, so
        every wait is bounded, and a client that still does not complete the
        close loses its TCP connection.
        """
        self.closing = True
        self._queue.clear()
        self._counted = 0
        if self._sender is not None:
            self._sender.cancel()
        self._finished = finished = asyncio.Event()
        try:
            async with asyncio.timeout(grace):
                await self._send({"type": "websocket.close", "code": code})
                await finished.wait()
        except TimeoutError:
            if self._abort is not None:
                log.info("dropping %s: it did not complete the close", self.id)
                self._abort()
        except Exception as exc:  # the client is already gone
            log.debug("close of %s failed: %r", self.id, exc)

    def stop(self) -> None:
        """The socket is gone: stop the sender and release anything waiting on it."""
        self.closing = True
        if self._finished is not None:
            self._finished.set()
        if self._sender is not None:
            self._sender.cancel()
        self._queue.clear()
        self._counted = 0

    @property
    def sending(self) -> bool:
        return self._sender is not None and not self._sender.done()
