"""Opening one connection: dial the server, then read its `welcome` (or its refusal).

The client needs little of a WebSocket (`Socket`): send and receive text, the
close code and reason, a close and an abort. `websockets_dial` opens one with
the `websockets` library; `roomcast.testing` dials the app in process instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import msgspec
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from ..protocol.envelopes import (
    SUBPROTOCOL,
    TOKEN_SUBPROTOCOL_PREFIX,
    Error,
    ServerEnvelope,
    Welcome,
)
from .events import InvalidRequest, error_of


class Abortable(Protocol):
    def abort(self) -> None: ...


class Socket(Protocol):
    """What the client uses of a WebSocket (a subset of websockets' `ClientConnection`).
    A closed connection raises `websockets.exceptions.ConnectionClosed`."""

    @property
    def close_code(self) -> int | None: ...

    @property
    def close_reason(self) -> str | None: ...

    @property
    def transport(self) -> Abortable: ...

    async def send(self, message: str) -> None: ...

    async def recv(self) -> str | bytes: ...

    def __aiter__(self) -> AsyncIterator[str | bytes]: ...

    async def close(self) -> None: ...


Dial = Callable[[str, list[str], float], Awaitable[Socket]]


async def websockets_dial(url: str, subprotocols: list[str], open_timeout: float) -> Socket:
    # No library keepalive: the protocol's heartbeat (`keepalive.Heartbeat`) covers it.
    ws = await connect(
        url,
        subprotocols=[Subprotocol(s) for s in subprotocols],
        open_timeout=open_timeout,
        close_timeout=5,
        ping_interval=None,
    )
    return ws


async def open_connection(
    dial: Dial,
    url: str,
    token: str | None,
    open_timeout: float,
    decoder: msgspec.json.Decoder[ServerEnvelope],
) -> tuple[Socket, Welcome]:
    """A connection that said `welcome`; a refusal raises its typed error."""
    offered = [SUBPROTOCOL]
    if token:
        offered.append(TOKEN_SUBPROTOCOL_PREFIX + token)
    ws = await dial(url, offered, open_timeout)
    try:
        async with asyncio.timeout(open_timeout):
            first = decoder.decode(await ws.recv())
        if isinstance(first, Error):  # refused: one error, then the close
            with contextlib.suppress(TimeoutError, ConnectionClosed):
                async with asyncio.timeout(5):
                    await ws.recv()
            raise error_of(first, ws.close_code)
        if not isinstance(first, Welcome):
            raise InvalidRequest("unexpected", f"expected welcome first, got {first!r}")
    except BaseException:
        ws.transport.abort()
        raise
    return ws, first


class ConnectionEnded(Exception):
    """The current connection ended: its close code, reason and last refless `error`."""

    def __init__(self, code: int | None, reason: str, last: Error | None) -> None:
        super().__init__(code, reason)
        self.code, self.reason, self.last = code, reason, last
