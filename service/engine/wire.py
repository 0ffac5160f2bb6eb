"""How frames reach one client: the only module that knows the ASGI server's WebSocket
internals (`cli.handshakes` has what `roomcast serve` adds to its HTTP protocol).

What it relies on, and what happens where that does not hold
(`tests/engine/test_wire.py` checks each against the installed uvicorn):

- **Inline send.** An ASGI `send` is a coroutine. uvicorn's (all three
  WebSocket implementations) writes to its transport and returns without
  suspending unless the transport is paused, and then it does not need a
  running task. So `Wire.write()` runs the coroutine by hand
  (`send.send(None)`): no task and no future per frame. When it suspends
  (the client reads slower than we write), the caller finishes it in a task
  (`Unfinished`). A `send` that is not a coroutine (another server) is
  awaited in a task every time.
- **Fast writes** (`FAST_WRITES=auto`), with uvicorn's websockets-sansio
  protocol only, and only when roomcast holds the server's own `send` (no
  middleware in between): prepared frames (`engine.frames`) are written
  straight to the protocol's transport, everything one turn of the event
  loop queued for a connection in one `write`, while the connection is OPEN
  (`conn.state`), no close was sent (`close_sent`), the transport is neither
  closing nor paused (`writable`), and nothing waits in the connection's
  queue. Otherwise the frame takes the ASGI `send`. uvicorn's own pings and
  the close frame go through the protocol, always between whole frames.
- **Shared deflate** (`WS_COMPRESSION=shared`): `roomcast serve` runs
  `SharedDeflateProtocol`, uvicorn's protocol negotiating permessage-deflate
  with no context takeover either way, so a broadcast compressed once is
  valid for every member that negotiated it, and no connection keeps a
  compressor. A connection that negotiated deflate with context takeover
  (`per-connection`, uvicorn's default) takes the ASGI path: only its own
  compressor can frame for it.
- **Transport abort.** An ASGI app cannot drop a TCP connection, but a client
  that never reads never completes the close handshake either. uvicorn's
  protocol object owns the transport: it is `send.__self__` when roomcast
  gets the server's own `send`, and otherwise (a host app's middleware
  wrapped `send`) the `self` of the coroutine the server runs the app in.
  Where neither is found, a warning is logged once, and such a client keeps
  its socket until TCP gives up.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from typing import Any, Final, cast

import uvicorn
from starlette.types import Scope, Send
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.extensions.permessage_deflate import (
    PerMessageDeflate,
    ServerPerMessageDeflateFactory,
)
from websockets.protocol import State
from websockets.server import ServerProtocol

from ..observe import metrics
from .frames import Frame

log = logging.getLogger("roomcast.connection")

Unfinished = Awaitable[None]

# The uvicorn releases whose websockets-sansio protocol the fast path was checked against.
UVICORN_TESTED: Final = ((0, 34), (0, 55))
_ATTRIBUTES: Final = ("conn", "transport", "writable", "close_sent")


class Wire:
    """One connection's way out through ASGI `send`: text frames, the close frame, the abort."""

    __slots__ = ("_abort", "_send")

    def __init__(self, send: Send, abort: Callable[[], None] | None = None) -> None:
        self._send = send
        self._abort = abort

    def write(self, text: str) -> Unfinished | None:
        """Write a text frame now. None when it is written; otherwise what finishes
        the write (to await in a task). Raises when the client is gone."""
        metrics.WRITES_ASGI.inc()
        sent = self._send({"type": "websocket.send", "text": text})
        if type(sent) is not types.CoroutineType:  # a server whose send is no coroutine
            return sent
        send = cast("Coroutine[Any, Any, None]", sent)
        try:
            waiting = send.send(None)
        except StopIteration:
            return None  # written without waiting: the usual case
        return _finish(send, waiting)

    def write_frames(self, frames: Sequence[Frame]) -> int:
        """Write prepared frames straight to the transport, as many as it takes now
        (the rest take `write`). Over ASGI: none."""
        return 0

    async def send(self, text: str) -> None:
        metrics.WRITES_ASGI.inc()
        await self._send({"type": "websocket.send", "text": text})

    async def close(self, code: int) -> None:
        await self._send({"type": "websocket.close", "code": code})

    def abort(self) -> None:
        """Drop the TCP connection, where the server lets us."""
        if self._abort is not None:
            self._abort()


class FastWire(Wire):
    """A connection of uvicorn's websockets-sansio protocol, written to directly."""

    __slots__ = ("_bits", "_high", "_protocol")

    def __init__(self, send: Send, protocol: Any, bits: int | None) -> None:
        super().__init__(send, protocol.transport.abort)
        self._protocol = protocol
        self._bits = bits  # the window of a shared deflate; None: plain frames
        _, high = protocol.transport.get_write_buffer_limits()
        self._high = max(high, 16384)

    def write_frames(self, frames: Sequence[Frame]) -> int:
        protocol = self._protocol
        transport = protocol.transport
        if (
            protocol.close_sent
            or not protocol.writable.is_set()
            or protocol.conn.state is not State.OPEN
            or transport.is_closing()
        ):
            return 0
        bits = self._bits
        if len(frames) == 1:
            frame = frames[0]
            transport.write(frame.plain if bits is None else frame.deflated(bits))
            metrics.WRITES_FAST.inc()
            return 1
        written = 0
        chunk: list[bytes] = []
        size = 0
        for frame in frames:
            data = frame.plain if bits is None else frame.deflated(bits)
            if chunk and size + len(data) > self._high:
                transport.write(b"".join(chunk))
                metrics.WRITES_FAST.inc()
                chunk, size = [], 0
                if not protocol.writable.is_set():  # paused: the rest waits its turn
                    return written
            chunk.append(data)
            size += len(data)
            written += 1
        transport.write(b"".join(chunk))
        metrics.WRITES_FAST.inc()
        return written


def wire_for(scope: Scope, send: Send, fast: bool) -> Wire:
    """The wire of a connection just accepted. `scope["roomcast.server_send"]` is the
    server's own `send`, kept by `Roomcast.__call__` before any middleware wrapped it."""
    server_send = scope.get("roomcast.server_send", send)
    protocol = getattr(server_send, "__self__", None)
    if fast and server_send is send and _fast_capable(protocol):
        bits = _shared_deflate_bits(protocol)
        if bits is not False:
            return FastWire(send, protocol, bits)
    elif fast:
        _say_once(
            "fallback",
            "connections take ASGI send: %s",
            "the server's send is wrapped (middleware around roomcast)"
            if server_send is not send
            else f"the server is not uvicorn's websockets-sansio ({type(protocol).__name__})",
        )
    return Wire(send, _abort_of(protocol))


def _fast_capable(protocol: object) -> bool:
    return isinstance(protocol, WebSocketsSansIOProtocol) and all(
        hasattr(protocol, name) for name in _ATTRIBUTES
    )


def _shared_deflate_bits(protocol: Any) -> int | bool | None:
    """None: no compression negotiated; the window bits of a deflate without context
    takeover; False: a compressor of its own (only the ASGI path can frame for it)."""
    extensions = protocol.conn.extensions
    if not extensions:
        return None
    if len(extensions) == 1 and isinstance(extensions[0], PerMessageDeflate):
        deflate = extensions[0]
        if deflate.local_no_context_takeover:
            return int(deflate.local_max_window_bits)
    return False


_said: set[str] = set()


def _say_once(key: str, message: str, *args: object) -> None:
    if key not in _said:
        _said.add(key)
        log.warning(message, *args)


def _abort_of(owner: object) -> Callable[[], None] | None:
    for candidate in (owner, _serving_protocol()):
        abort = getattr(getattr(candidate, "transport", None), "abort", None)
        if callable(abort):
            return cast("Callable[[], None]", abort)
    _say_once(
        "abort",
        "this ASGI server gives roomcast no way to drop a TCP connection: a client that "
        "stops reading keeps its socket until TCP gives up",
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


# --- the server side: what `roomcast serve` runs -----------------------------------


class SharedDeflateProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol, negotiating permessage-deflate without context
    takeover (`WS_COMPRESSION=shared`): no connection keeps a compressor or decompressor
    between messages, and one compressed broadcast serves every member."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = ServerProtocol(
            extensions=[
                ServerPerMessageDeflateFactory(
                    server_no_context_takeover=True,
                    client_no_context_takeover=True,
                    compress_settings=dict(Frame.COMPRESS_SETTINGS),
                )
            ],
            max_size=self.config.ws_max_size,
            logger=logging.getLogger("uvicorn.error"),
        )


def uvicorn_options(compression: str) -> dict[str, Any]:
    """uvicorn's WebSocket options for a `WS_COMPRESSION` value."""
    if compression == "shared":
        return {"ws": f"{__name__}:SharedDeflateProtocol", "ws_per_message_deflate": True}
    return {"ws": "websockets-sansio", "ws_per_message_deflate": compression == "per-connection"}


def fast_writes_available() -> tuple[bool, str]:
    """Whether this uvicorn's protocol is one the fast path was checked against, and why."""
    version = tuple(int(part) for part in uvicorn.__version__.split(".")[:2])
    low, high = UVICORN_TESTED
    if not low <= version <= high:
        return False, f"uvicorn {uvicorn.__version__} is not a release it was checked against"
    if not all(callable(getattr(WebSocketsSansIOProtocol, n, None)) for n in ("send", "run_asgi")):
        return False, f"uvicorn {uvicorn.__version__}'s websockets-sansio protocol has changed"
    return True, f"uvicorn {uvicorn.__version__} websockets-sansio connections"
