"""What iterating a client yields: envelopes and the client's own events, in order, then
the end (raising the error that ended the client, unless it was closed normally)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final, cast

from ..protocol.codes import Close
from .events import ClientError, Closed, Event

_END: Final = object()


class Inbox:
    def __init__(self, max_queue: int) -> None:
        # Backpressure: a caller that does not iterate stops the reading, the
        # server closes with 4408, and the client recovers once it reads again.
        self._queue: asyncio.Queue[object] = asyncio.Queue(max_queue)
        self.fatal: ClientError | None = None
        self._ended = False

    def full(self) -> bool:
        return self._queue.full()

    async def put(self, item: Event) -> None:
        await self._queue.put(item)

    def end(self, error: ClientError) -> ClientError:
        """End for good with `error` (the first error given wins); returns that error."""
        if self.fatal is None:
            self.fatal = error
        self._ended = True
        with contextlib.suppress(asyncio.QueueFull):  # full: next() sees _ended when drained
            self._queue.put_nowait(_END)  # wakes a next() waiting on an empty queue
        return self.fatal

    async def next(self) -> Event:
        item = _END if self._ended and self._queue.empty() else await self._queue.get()
        if item is _END:
            fatal = self.fatal
            if fatal is not None and not (
                isinstance(fatal, Closed) and fatal.close_code in (None, Close.NORMAL)
            ):
                raise fatal
            raise StopAsyncIteration
        return cast(Event, item)
