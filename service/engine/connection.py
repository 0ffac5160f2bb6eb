"""One WebSocket connection: its user, its rooms, its bounded outbox and sender.

Fan-out only ever calls `push()`, which never awaits: a frame goes into the
outbox or, when the outbox is full, the connection is handed to `on_overflow`
(the hub closes it with 4408). What a turn of the event loop pushed is
written at the next turn, in one callback for every connection, through the
connection's `Wire` (which writes without waiting where the server allows
it). Only when a write must wait (the client reads slower than we write)
does a sender task finish it and drain what queues behind it, so a slow
client only ever slows itself, and an idle connection costs no task.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..protocol.codes import Close
from ..protocol.envelopes import User
from .frames import Frame
from .limits import BadFrames, RateLimiter
from .wire import Wire

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
        "_counted",
        "_finished",
        "_flush",
        "_limiter",
        "_live",
        "_pending",
        "_queue",
        "_rate",
        "_sender",
        "_started",
        "bad_frames",
        "closing",
        "id",
        "limit",
        "on_overflow",
        "rooms",
        "user",
        "wire",
    )

    def __init__(
        self,
        conn_id: str,
        user: User,
        wire: Wire,
        *,
        limit: int,
        rate: int,
        on_overflow: Callable[[Connection], None],
    ) -> None:
        self.id = conn_id
        self.user = user
        self.rooms: set[str] = set()
        self.limit = limit
        # Made on the first frame received: most members of a big room never send one.
        self._rate = float(rate)
        self._limiter: RateLimiter | None = None
        self.bad_frames = BadFrames()
        self.closing = False
        self.on_overflow = on_overflow
        self.wire = wire
        # Frames pushed in this turn of the event loop, written at the next one: one
        # frame as itself (a list per recipient per message kept the garbage
        # collector busy), several as a list.
        self._pending: Frame | list[Frame] | None = None
        self._flush: _Flush | None = None
        # Created when something must wait, released when drained: idle connections are many.
        self._queue: deque[Any] | None = None
        self._counted = 0
        # Invariant: once started, `_sender is None` means nothing is queued or in flight.
        self._sender: asyncio.Task[None] | None = None
        self._started = False
        self._live = True
        self._finished: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"<Connection {self.id} user={self.user.id!r} rooms={len(self.rooms)}>"

    @property
    def limiter(self) -> RateLimiter:
        limiter = self._limiter
        if limiter is None:  # a bucket made now is as full as one made at connect
            limiter = self._limiter = RateLimiter(self._rate)
        return limiter

    # --- queueing (never awaits) -----------------------------------------

    def push(self, frame: Frame) -> bool:
        if self.closing:
            return False
        if self._sender is None and self._flush is not None:
            # Written at the next turn: not queued behind the client, so not counted
            # (and the same Frame for every recipient: a reference each).
            pending = self._pending
            if pending is None:
                self._pending = frame
                self._flush.add(self)
            elif type(pending) is Frame:
                self._pending = [pending, frame]
            else:
                pending.append(frame)  # type: ignore[union-attr]
            return True
        # Behind a send that waits for the client (or before start()).
        if self._counted >= self.limit:
            self._overflow()
            return False
        self._counted += 1
        self._enqueue(frame)
        return True

    def send(self, text: str) -> bool:
        """Push one encoded envelope meant for this connection alone."""
        return self.push(Frame(text))

    def _overflow(self) -> None:
        self.closing = True
        self._pending = None
        self.on_overflow(self)

    def push_replay(self, frames: list[str]) -> None:
        if frames and not self.closing:
            self._pending_to_queue()
            self._enqueue(Replay(frames))
            self._ensure_sender()

    def close_after_queued(self, code: int) -> None:
        """Send what is queued (the error that explains why), then close."""
        if not self.closing:
            self.closing = True
            self._pending_to_queue()
            self._enqueue(_CloseAfter(code))
            self._ensure_sender()

    def _pending_to_queue(self) -> None:
        pending = self._pending
        if pending is not None:
            self._pending = None
            self._enqueue_all([pending] if isinstance(pending, Frame) else pending)

    def write_pending(self) -> None:
        """Write what was pushed in the last turn of the event loop, in one go."""
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        if not self._live:
            return
        frames: Sequence[Frame] = (pending,) if type(pending) is Frame else pending  # type: ignore[assignment]
        if self._sender is None:
            # Straight to the transport, all in one write, where the wire allows it.
            try:
                written = self.wire.write_frames(frames)
            except Exception as exc:  # the client went away
                self._failed(exc)
                return
            if written == len(frames):
                return
            frames = frames[written:]
        for index, frame in enumerate(frames):
            if self._sender is not None:  # a send had to wait: the rest queues behind it
                rest = list(frames[index:])
                if self._counted + len(rest) > self.limit:
                    self._overflow()
                else:
                    self._enqueue_all(rest)
                return
            if not self._live:
                return
            self._write(frame)

    def _enqueue_all(self, frames: list[Frame]) -> None:
        self._counted += len(frames)
        if self._queue is None:
            self._queue = deque(frames)
        else:
            self._queue.extend(frames)

    def _enqueue(self, item: Any) -> None:
        if self._queue is None:
            self._queue = deque()
        self._queue.append(item)

    def _write(self, frame: Frame) -> None:
        """Write one frame now; only when nothing is queued or in flight."""
        try:
            unfinished = self.wire.write(frame.text)
        except Exception as exc:  # the client went away
            self._failed(exc)
            return
        if unfinished is not None:
            # The client reads slower than we write: the sender task finishes
            # this write, then anything queued behind it.
            self._sender = asyncio.create_task(
                self._drain(unfinished), name=f"roomcast-send-{self.id}"
            )

    def _ensure_sender(self) -> None:
        if self._started and self._sender is None and self._queue:
            self._sender = asyncio.create_task(self._drain(None), name=f"roomcast-send-{self.id}")

    def _failed(self, exc: BaseException) -> None:
        log.debug("sender of %s stopped: %r", self.id, exc)
        self.closing = True
        self._live = False
        self._pending = None
        self._queue = None
        self._counted = 0

    # --- the sender ------------------------------------------------------

    def start(self) -> None:
        """The socket is accepted: write what was queued before (the welcome)."""
        self._started = True
        self._flush = _Flush.of_running_loop()
        queue = self._queue
        while queue and self._sender is None and type(queue[0]) is Frame:
            self._counted -= 1
            self._write(queue.popleft())
        if self._sender is None and not self.closing:
            if self._queue:
                self._ensure_sender()
            else:
                self._queue = None

    async def _drain(self, unfinished: Awaitable[None] | None) -> None:
        wire, loop_task = self.wire, asyncio.current_task()
        try:
            if unfinished is not None:
                await unfinished
            queue = self._queue
            while queue:
                item = queue.popleft()
                if type(item) is Frame:
                    self._counted -= 1
                    await wire.send(item.text)
                elif type(item) is Replay:
                    for frame in item.frames:
                        await wire.send(frame)
                else:
                    await wire.close(item.code)
                    return
            # Everything queued is written: from now on push() writes inline again.
            self._queue = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client went away mid-send
            self._failed(exc)
        finally:
            if self._sender is loop_task:
                self._sender = None

    async def drop(self, code: int = Close.SLOW_CONSUMER, grace: float = DROP_TIMEOUT) -> None:
        """Close now, without waiting for the queue: for a client that does not read.

        The close frame can only be written once the client reads again, so
        every wait is bounded, and a client that still does not complete the
        close loses its TCP connection.
        """
        self.closing = True
        self._pending = None
        self._queue = None
        self._counted = 0
        if self._sender is not None:
            self._sender.cancel()
        self._finished = finished = asyncio.Event()
        try:
            async with asyncio.timeout(grace):
                await self.wire.close(code)
                await finished.wait()
        except TimeoutError:
            log.info("dropping %s: it did not complete the close", self.id)
            self.wire.abort()
        except Exception as exc:  # the client is already gone
            log.debug("close of %s failed: %r", self.id, exc)

    def stop(self) -> None:
        """The socket is gone: stop the sender and release anything waiting on it."""
        self.closing = True
        self._live = False
        if self._finished is not None:
            self._finished.set()
        if self._sender is not None:
            self._sender.cancel()
        self._pending = None
        self._queue = None
        self._counted = 0

    @property
    def sending(self) -> bool:
        """True from `start()` until the socket is gone: frames are written inline
        or by the sender task."""
        return self._started and self._live


class _Flush:
    """The connections that were pushed frames in this turn of the event loop.

    They are written at the next turn, all in one callback: a connection that
    got several frames meanwhile writes them back to back, and uvloop sends
    the writes of one turn to a socket in one system call. That is the
    outbox drain sending everything queued in one wake-up, without a task
    and a future per connection.
    """

    __slots__ = ("__weakref__", "connections", "loop", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.connections: list[Connection] = []
        self.scheduled = False

    @classmethod
    def of_running_loop(cls) -> _Flush:
        loop = asyncio.get_running_loop()
        flush = _FLUSHES.get(loop)
        if flush is None:
            flush = _FLUSHES[loop] = cls(loop)
        return flush

    def add(self, conn: Connection) -> None:
        self.connections.append(conn)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.run)

    def run(self) -> None:
        self.scheduled = False
        connections, self.connections = self.connections, []
        for conn in connections:
            try:
                conn.write_pending()
            except Exception:  # one connection's bug must not silence the others
                log.exception("writing to %s failed", conn.id)


_FLUSHES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Flush] = weakref.WeakKeyDictionary()
