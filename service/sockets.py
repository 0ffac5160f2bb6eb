"""The WebSocket edges: `/ws` (multiplexed) and `/ws/{room}`.

Each frame is checked against the connection's limits, decoded once with the
app's decoder and dispatched on its type; answers go through the
connection's outbox, never straight to the socket.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgspec
from starlette.endpoints import WebSocketEndpoint
from starlette.websockets import WebSocket

from . import metrics
from .auth import (
    Unauthorized,
    anonymous_user,
    origin_allowed,
    room_permitted,
    token_from,
    verify_token,
)
from .connection import Connection
from .envelopes import (
    SUBPROTOCOL,
    Ack,
    ClientEnvelope,
    Close,
    Codec,
    Envelope,
    Error,
    ErrorCode,
    GetPresence,
    Join,
    Leave,
    Ping,
    Pong,
    Refresh,
    SendChat,
    Since,
    Welcome,
    encode,
    is_room_name,
    ref_of,
)
from .hub import Hub, HubError
from .limits import Verdict
from .settings import Settings

log = logging.getLogger("roomcast.sockets")

Handler = Callable[["RoomSocket", Any], Awaitable[None]]

ROOM_RULE = "Room names are 1 to 64 characters of A-Z a-z 0-9 _ - . : (case-sensitive)"


@dataclass(slots=True)
class SocketContext:
    """What the endpoints share within one app: built once, used for every frame."""

    hub: Hub
    settings: Settings
    codec: Codec
    handlers: dict[type[ClientEnvelope], Handler] = field(default_factory=dict)


class RoomSocket(WebSocketEndpoint):
    """`WS /ws`: one connection, any number of rooms joined with `join`."""

    encoding = None  # Starlette's encodings close on a bad frame; we answer `error`.
    context: ClassVar[SocketContext]
    conn: Connection | None = None
    room: str | None = None  # the room of `/ws/{room}`
    # With JWT_SECRET: the rooms the token permits (None: any) and its `exp`,
    # with the timer that closes the connection with 4401 then.
    permitted: tuple[str, ...] | None = None
    token_expires: int | None = None
    _expiry: asyncio.TimerHandle | None = None

    @property
    def hub(self) -> Hub:
        return self.context.hub

    # --- connect ---------------------------------------------------------

    async def on_connect(self, websocket: WebSocket) -> None:
        settings, hub = self.context.settings, self.context.hub
        offered: list[str] = list(websocket.scope.get("subprotocols", ()))
        # Never the token's subprotocol: the handshake's answer would echo it.
        subprotocol = SUBPROTOCOL if SUBPROTOCOL in offered else None
        self.room = websocket.path_params.get("room")
        if len(hub.connections) >= settings.max_connections:
            return await self._refuse(
                websocket,
                subprotocol,
                Close.TOO_MANY,
                "too_many_connections",
                f"This server holds its maximum of {settings.max_connections} connections "
                "(MAX_CONNECTIONS): retry later with backoff.",
            )
        origin = websocket.headers.get("origin")
        if not origin_allowed(origin, settings.allowed_origins):
            log.info("refused a connection from origin %r (ALLOWED_ORIGINS)", origin)
            return await self._refuse(
                websocket,
                subprotocol,
                Close.FORBIDDEN,
                "origin_not_allowed",
                f"Pages from {origin!r} may not connect here: the server's ALLOWED_ORIGINS "
                "does not list it.",
            )
        if self.room is not None and not is_room_name(self.room):
            return await self._refuse(
                websocket,
                subprotocol,
                Close.POLICY_VIOLATION,
                "invalid_room",
                f"{ROOM_RULE}; got {self.room!r}.",
            )
        query = websocket.query_params
        if settings.jwt_secret is None:
            user = anonymous_user(
                query.get("client"), query.get("username"), settings.max_name_chars
            )
        else:
            try:
                grant = verify_token(
                    token_from(query.get("token"), offered),
                    str(settings.jwt_secret),
                    settings.max_name_chars,
                )
            except Unauthorized as exc:
                log.info("refused a connection: %s", exc.detail)
                return await self._refuse(
                    websocket, subprotocol, Close.UNAUTHORIZED, "unauthorized", exc.detail
                )
            if self.room is not None and not grant.permits(self.room):
                log.info("refused user %r the room %r: not in its token", grant.user.id, self.room)
                return await self._refuse(
                    websocket,
                    subprotocol,
                    Close.FORBIDDEN,
                    "forbidden",
                    f"Your token does not permit room {self.room!r}.",
                )
            user = grant.user
            self.permitted, self.token_expires = grant.rooms, grant.expires
        conn = Connection(
            secrets.token_hex(8),
            user,
            self.send,
            limit=settings.outbox_size,
            rate=settings.rate_limit,
            on_overflow=hub.on_overflow,
            abort=_transport_abort(websocket),
        )
        # Counted before the accept awaits, so MAX_CONNECTIONS holds under a burst of connects.
        self.conn = conn
        hub.attach(conn)
        await websocket.accept(subprotocol=subprotocol)
        conn.push(encode(Welcome(conn=conn.id, user=user, heartbeat=settings.heartbeat_seconds)))
        conn.start()
        self._schedule_expiry()
        if self.room is not None:
            await self._auto_join(conn, self.room, query.get("since"), query.get("history"))

    def _schedule_expiry(self) -> None:
        """(Re)arm the timer that closes the connection at its token's `exp`."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self.token_expires is not None:
            loop = asyncio.get_running_loop()
            at = loop.time() + (self.token_expires - time.time())
            self._expiry = loop.call_at(at, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        conn = self.conn
        if conn is None or conn.closing:
            return
        log.info("closing %s of user %r: its token expired", conn.id, conn.user.id)
        self._error(
            "unauthorized",
            "The token expired: send `refresh` with a new token before `exp`, "
            "or reconnect with one.",
        )
        conn.close_after_queued(Close.UNAUTHORIZED)

    async def _refuse(
        self,
        websocket: WebSocket,
        subprotocol: str | None,
        code: int,
        error: ErrorCode,
        detail: str,
    ) -> None:
        # A browser cannot read a refused handshake's status: accept, explain, close.
        await websocket.accept(subprotocol=subprotocol)
        await websocket.send_text(encode(Error(code=error, detail=detail)))
        metrics.error_sent(error)
        await websocket.close(code)

    async def _auto_join(
        self, conn: Connection, room: str, since_raw: str | None, history_raw: str | None
    ) -> None:
        since: Since | None = None
        history: int | None = None
        try:
            if since_raw:
                epoch, _, offset = since_raw.rpartition(":")
                since = Since(epoch, int(offset))
                if not epoch or since.offset < 0:
                    raise ValueError
            if history_raw:
                history = int(history_raw)
                if history < 0:
                    raise ValueError
        except ValueError:
            self._error(
                "invalid_message",
                "Query parameters: `since` must be EPOCH:OFFSET and `history` a count >= 0.",
                room=room,
            )
            since = history = None
        await self._run(RoomSocket.on_join, Join(room=room, since=since, history=history))

    # --- frames ----------------------------------------------------------

    async def on_receive(self, websocket: WebSocket, data: str | bytes) -> None:
        conn = self.conn
        if conn is None or conn.closing:
            return
        settings = self.context.settings
        verdict = conn.limiter.check(asyncio.get_running_loop().time())
        if verdict != Verdict.OK:
            metrics.RATE_LIMITED.inc()
            self._error(
                "rate_limited",
                f"Slow down: at most {settings.rate_limit} frames per second (RATE_LIMIT).",
                ref=ref_of(data) if type(data) is str else None,
            )
            if verdict == Verdict.CLOSE:
                conn.close_after_queued(Close.TOO_MANY)
            return
        if type(data) is not str:
            metrics.IN_OTHER.inc()
            return self._bad("unsupported_frame", "Binary frames are not supported: send text.")
        limit = settings.max_message_bytes
        if len(data) > limit or (len(data) * 4 > limit and len(data.encode()) > limit):
            metrics.IN_OTHER.inc()
            conn.close_after_queued(Close.TOO_BIG)
            return
        if self.room is not None and not data.lstrip().startswith("{"):
            message: ClientEnvelope = SendChat(text=data, room=self.room)
        else:
            try:
                message = self.context.codec.decode(data)
            except msgspec.ValidationError as exc:
                metrics.IN_OTHER.inc()
                return self._invalid(data, str(exc))
            except msgspec.DecodeError as exc:
                metrics.IN_OTHER.inc()
                return self._bad("invalid_json", f"The frame is not valid JSON: {exc}.")
        if self.room is not None and type(message) is SendChat and message.room is None:
            message.room = self.room
        conn.bad_frames.good()
        metrics.received(type(message))
        handler = self.context.handlers.get(type(message))
        if handler is None:  # a registered type without a handler is a wiring mistake
            return self._error("internal", f"No handler for {type(message).__name__}.")
        await self._run(handler, message)

    async def _run(self, handler: Handler, message: Any) -> None:
        try:
            await handler(self, message)
        except HubError as exc:
            self._error(exc.code, exc.detail, ref=message.ref, room=getattr(message, "room", None))
        except Exception:
            log.exception("handling %s failed", type(message).__name__)
            self._error("internal", "The server failed on this request.", ref=message.ref)

    def _invalid(self, frame: str, problem: str) -> None:
        ref = ref_of(frame)
        if "`$.room`" in problem and ("regex" in problem or "length" in problem):
            self._error("invalid_room", f"{ROOM_RULE}: {problem}.", ref=ref)
        else:
            self._bad("invalid_message", f"{problem}.", ref=ref)

    def _bad(self, code: ErrorCode, detail: str, ref: str | None = None) -> None:
        conn = self.conn
        assert conn is not None
        self._error(code, detail, ref=ref)
        if conn.bad_frames.bad():
            conn.close_after_queued(Close.POLICY_VIOLATION)

    def _error(
        self, code: ErrorCode, detail: str, ref: str | None = None, room: str | None = None
    ) -> None:
        if self.conn is not None:
            metrics.error_sent(code)
            self.conn.push(encode(Error(code=code, detail=detail, ref=ref, room=room)))

    def reply(self, envelope: Envelope) -> None:
        """Queue an envelope for this connection (for custom handlers)."""
        assert self.conn is not None
        self.conn.push(encode(envelope))

    # --- handlers of the protocol's requests -----------------------------

    async def on_join(self, message: Join) -> None:
        assert self.conn is not None
        if not room_permitted(message.room, self.permitted):
            raise HubError("forbidden", f"Your token does not permit room {message.room!r}.")
        await self.hub.join(
            self.conn, message.room, since=message.since, history=message.history, ref=message.ref
        )

    async def on_leave(self, message: Leave) -> None:
        assert self.conn is not None
        await self.hub.leave(self.conn, message.room, message.ref)

    async def on_chat(self, message: SendChat) -> None:
        conn = self.conn
        assert conn is not None
        room = message.room
        if room is None:
            return self._bad(
                "invalid_message", "Object missing required field `room`.", ref=message.ref
            )
        if not message.text.strip():
            return self._bad("invalid_message", "`text` is blank - at `$.text`.", ref=message.ref)
        self._joined(room)
        max_chars = self.context.settings.max_text_chars
        if len(message.text) > max_chars:
            raise HubError(
                "text_too_long",
                f"`text` has {len(message.text)} characters; at most {max_chars} (MAX_TEXT_CHARS).",
            )
        appended = await self.hub.chat(conn.user, room, message.text, message.ref)
        conn.push(encode(Ack(ref=message.ref, room=room, offset=appended.offset)))

    async def on_presence(self, message: GetPresence) -> None:
        self._joined(message.room)
        self.reply(await self.hub.snapshot(message.room, message.ref))

    async def on_refresh(self, message: Refresh) -> None:
        """A new token for the same user: its `exp` and `rooms` replace the old ones.

        Rooms the new token no longer permits are left (`left`). An invalid
        token, or one for another `sub`, closes the connection with 4401.
        Anonymous mode has no token to extend.
        """
        conn = self.conn
        settings = self.context.settings
        assert conn is not None
        if settings.jwt_secret is None:
            return
        try:
            grant = verify_token(message.token, str(settings.jwt_secret), settings.max_name_chars)
            if grant.user.id != conn.user.id:
                raise Unauthorized(
                    "The refreshed token is for another user (`sub`): reconnect with it instead."
                )
        except Unauthorized as exc:
            log.info(
                "closing %s of user %r: refresh refused: %s", conn.id, conn.user.id, exc.detail
            )
            self._error("unauthorized", exc.detail, ref=message.ref)
            conn.close_after_queued(Close.UNAUTHORIZED)
            return
        self.permitted, self.token_expires = grant.rooms, grant.expires
        self._schedule_expiry()
        for room in sorted(conn.rooms):
            if not grant.permits(room):
                await self.hub.leave(conn, room, message.ref)

    async def on_ping(self, message: Ping) -> None:
        self.reply(Pong(ref=message.ref))

    def _joined(self, room: str) -> None:
        assert self.conn is not None
        if room not in self.conn.rooms:
            raise HubError("not_joined", f"Join room {room!r} first.")

    # --- disconnect ------------------------------------------------------

    async def on_disconnect(self, websocket: WebSocket, close_code: int) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self.conn is not None:
            await self.hub.detach(self.conn)


PROTOCOL_HANDLERS: dict[type[ClientEnvelope], Handler] = {
    Join: RoomSocket.on_join,
    Leave: RoomSocket.on_leave,
    SendChat: RoomSocket.on_chat,
    GetPresence: RoomSocket.on_presence,
    Refresh: RoomSocket.on_refresh,
    Ping: RoomSocket.on_ping,
}


def _transport_abort(websocket: WebSocket) -> Callable[[], None] | None:
    """The server's way to drop a TCP connection, when the server exposes one.

    An ASGI app cannot abort a connection; uvicorn's protocol object (the
    owner of the raw `send` the app captured at its edge) can. Without it, a
    client that never reads keeps its socket until TCP gives up.
    """
    server_send = websocket.scope.get("roomcast.server_send")
    transport = getattr(getattr(server_send, "__self__", None), "transport", None)
    abort = getattr(transport, "abort", None)
    return abort if callable(abort) else None
