"""How frames reach one client: the only module that knows the ASGI server's internals.

What it relies on, and what happens where that does not hold:

- **Inline send.** An ASGI `send` is a coroutine. uvicorn's (all three
  WebSocket implementations) writes to its transport and returns without
  suspending unless the transport is paused, and then it does not need a
  running task. So `write()` runs the coroutine by hand (`send.send(None)`):
  no task and no future per frame, as `websockets.broadcast()` writes without
  awaiting each client. When it suspends (the client reads slower than we
  write), the caller finishes it in a task (`Unfinished`). A `send` that is
  not a coroutine (another server) is awaited in a task every time.
- **Transport abort.** An ASGI app cannot drop a TCP connection, but a client
  that never reads never completes the close handshake either. uvicorn's
  protocol object owns the transport: it is `send.__self__` when roomcast
  gets the server's own `send`, and otherwise (a host app's middleware
  wrapped `send`) the `self` of the coroutine the server runs the app in.
  Where neither is found, a warning is logged once, and such a client keeps
  its socket until TCP gives up.

`tests/engine/test_wire.py` checks these assumptions against the installed uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, cast

from starlette.types import Scope, Send

log = logging.getLogger("roomcast.connection")

Unfinished = Awaitable[None]


class Wire:
    """One connection's way out: text frames, the close frame, and the TCP abort."""

    __slots__ = ("_abort", "_send")

    def __init__(self, send: Send, abort: Callable[[], None] | None = None) -> None:
        self._send = send
        self._abort = abort

    def write(self, text: str) -> Unfinished | None:
        """Write a text frame now. None when it is written; otherwise what finishes
        the write (to await in a task). Raises when the client is gone."""
        sent = self._send({"type": "websocket.send", "text": text})
        if type(sent) is not types.CoroutineType:  # a server whose send is no coroutine
            return sent
        send = cast("Coroutine[Any, Any, None]", sent)
        try:
            waiting = send.send(None)
        except StopIteration:
            return None  # written without waiting: the usual case
        return _finish(send, waiting)

    async def send(self, text: str) -> None:
        await self._send({"type": "websocket.send", "text": text})

    async def close(self, code: int) -> None:
        await self._send({"type": "websocket.close", "code": code})

    def abort(self) -> None:
        """Drop the TCP connection, where the server lets us."""
        if self._abort is not None:
            self._abort()


def wire_for(scope: Scope, send: Send) -> Wire:
    """The wire of a new connection; `scope["roomcast.server_send"]` is the server's own
    `send`, kept by `Roomcast.__call__` before any middleware wrapped it."""
    return Wire(send, _abort_of(scope.get("roomcast.server_send", send)))


_warned = False


def _abort_of(send: Send) -> Callable[[], None] | None:
    global _warned
    for owner in (getattr(send, "__self__", None), _serving_protocol()):
        abort = getattr(getattr(owner, "transport", None), "abort", None)
        if callable(abort):
            return cast("Callable[[], None]", abort)
    if not _warned:
        _warned = True
        log.warning(
            "this ASGI server gives roomcast no way to drop a TCP connection: a client that "
            "stops reading keeps its socket until TCP gives up"
        )
    return None


def _serving_protocol() -> object | None:
    """The `self` of the coroutine the server runs the app in (uvicorn's protocol object)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return None
    coro = task.get_coro() if task is not None else None
    frame = getattr(coro, "cr_frame", None)
    return None if frame is None else frame.f_locals.get("self")


@types.coroutine
def _yield_to_task(waiting: Any) -> Generator[Any, None, None]:
    # The future the inline send stopped on (already marked as blocking):
    # the running task waits on it as if the send had been awaited in it.
    yield waiting


async def _finish(send: Coroutine[Any, Any, None], waiting: Any) -> None:
    """Run to its end a send coroutine that was started inline and had to wait."""
    try:
        while True:
            await _yield_to_task(waiting)
            waiting = send.send(None)
    except StopIteration:
        return
    except BaseException:
        send.close()  # cancelled while waiting: let the send clean up (its waiter)
        raise
