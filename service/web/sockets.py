"""The WebSocket edges: `/ws` (multiplexed) and `/ws/{room}`.

A connection passes `handshake.admit` before its `welcome`. Each frame is then
checked against the connection's limits, decoded once with the app's decoder
and dispatched on its type; answers go through the connection's outbox,
never straight to the socket.
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

from ..engine.connection import Connection
from ..engine.hub import Hub
from ..engine.limits import Verdict
from ..engine.wire import wire_for
from ..errors import ProtocolError, Refuse
from ..observe import metrics
from ..protocol.codec import Codec, encode, ref_of, salvage
from ..protocol.codes import Close, ErrorCode
from ..protocol.envelopes import (
    Ack,
    ClientEnvelope,
    Envelope,
    Error,
    GetPresence,
    Join,
    Leave,
    Ping,
    Pong,
    Refresh,
    SendChat,
    User,
    Welcome,
    is_room_name,
)
from ..settings import Settings
from .auth import Unauthorized, room_permitted, verify_token
from .handshake import ROOM_RULE, admit, join_query, subprotocol_of

log = logging.getLogger("roomcast.sockets")

Handler = Callable[["RoomSocket", Any], Awaitable[None]]


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

    @property
    def connection(self) -> Connection:
        if self.conn is None:
            raise RuntimeError("this socket is not connected (it was refused, or not yet)")
        return self.conn

    @property
    def user(self) -> User:
        """Who is connected: the token's user, or the anonymous identity."""
        return self.connection.user

    @property
    def rooms(self) -> frozenset[str]:
        """The rooms this connection has joined."""
        return frozenset(self.connection.rooms)

    def reply(self, envelope: Envelope) -> None:
        """Queue an envelope for this connection (for custom handlers)."""
        self.connection.push(encode(envelope))

    # --- connect ---------------------------------------------------------

    async def on_connect(self, websocket: WebSocket) -> None:
        settings, hub = self.context.settings, self.context.hub
        offered: list[str] = list(websocket.scope.get("subprotocols", ()))
        subprotocol = subprotocol_of(offered)
        self.room = websocket.path_params.get("room")
        query = websocket.query_params
        try:
            admission = admit(
                settings, len(hub.connections), websocket.headers, query, offered, self.room
            )
        except Refuse as refusal:
            # A browser cannot read a refused handshake's status: accept, explain, close.
            await websocket.accept(subprotocol=subprotocol)
            await websocket.send_text(encode(Error(code=refusal.error, detail=refusal.detail)))
            metrics.error_sent(refusal.error)
            await websocket.close(refusal.code)
            return
        user = admission.user
        self.permitted, self.token_expires = admission.permitted, admission.expires
        conn = Connection(
            secrets.token_hex(8),
            user,
            wire_for(websocket.scope, self.send),
            limit=settings.outbox_size,
            rate=settings.rate_limit,
            on_overflow=hub.on_overflow,
        )
        # Counted before the accept awaits, so MAX_CONNECTIONS holds under a burst of connects.
        self.conn = conn
        hub.attach(conn)
        await websocket.accept(subprotocol=subprotocol)
        conn.push(encode(Welcome(conn=conn.id, user=user, heartbeat=settings.heartbeat_seconds)))
        conn.start()
        self._schedule_expiry()
        if self.room is not None:
            await self._auto_join(self.room, query.get("since"), query.get("history"))

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
            ErrorCode.UNAUTHORIZED,
            "The token expired: send `refresh` with a new token before `exp`, "
            "or reconnect with one.",
        )
        conn.close_after_queued(Close.UNAUTHORIZED)

    async def _auto_join(self, room: str, since_raw: str | None, history_raw: str | None) -> None:
        try:
            since, history = join_query(since_raw, history_raw)
        except ValueError:
            self._error(
                ErrorCode.INVALID_MESSAGE,
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
                ErrorCode.RATE_LIMITED,
                f"Slow down: at most {settings.rate_limit} frames per second (RATE_LIMIT).",
                ref=ref_of(data) if type(data) is str else None,
            )
            if verdict == Verdict.CLOSE:
                conn.close_after_queued(Close.TOO_MANY)
            return
        self.context.hub.activity.messages_in.add()  # as roomcast_messages_in_total counts
        if type(data) is not str:
            metrics.IN_OTHER.inc()
            return self._bad(
                ErrorCode.UNSUPPORTED_FRAME, "Binary frames are not supported: send text."
            )
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
                return self._bad(ErrorCode.INVALID_JSON, f"The frame is not valid JSON: {exc}.")
        if self.room is not None and type(message) is SendChat and message.room is None:
            message.room = self.room
        conn.bad_frames.good()
        metrics.received(type(message))
        handler = self.context.handlers.get(type(message))
        if handler is None:  # a registered type without a handler is a wiring mistake
            return self._error(ErrorCode.INTERNAL, f"No handler for {type(message).__name__}.")
        await self._run(handler, message)

    async def _run(self, handler: Handler, message: Any) -> None:
        try:
            await handler(self, message)
        except ProtocolError as exc:
            self._error(exc.code, exc.detail, ref=message.ref, room=getattr(message, "room", None))
        except Exception:
            log.exception("handling %s failed", type(message).__name__)
            self._error(ErrorCode.INTERNAL, "The server failed on this request.", ref=message.ref)

    def _invalid(self, frame: str, problem: str) -> None:
        """A frame that decodes as JSON but not as a request: a room name that breaks
        the rule is `invalid_room` (a request error), anything else a bad frame."""
        view = salvage(frame)
        if isinstance(view.room, str) and not is_room_name(view.room):
            self._error(ErrorCode.INVALID_ROOM, f"{ROOM_RULE}; got {view.room!r}.", ref=view.ref)
        else:
            self._bad(ErrorCode.INVALID_MESSAGE, f"{problem}.", ref=view.ref)

    def _bad(self, code: ErrorCode, detail: str, ref: str | None = None) -> None:
        self._error(code, detail, ref=ref)
        if self.connection.bad_frames.bad():
            self.connection.close_after_queued(Close.POLICY_VIOLATION)

    def _error(
        self, code: ErrorCode, detail: str, ref: str | None = None, room: str | None = None
    ) -> None:
        if self.conn is not None:
            metrics.error_sent(code)
            self.conn.push(encode(Error(code=code, detail=detail, ref=ref, room=room)))

    # --- handlers of the protocol's requests -----------------------------

    async def on_join(self, message: Join) -> None:
        if not room_permitted(message.room, self.permitted):
            raise ProtocolError("forbidden", f"Your token does not permit room {message.room!r}.")
        await self.hub.join(
            self.connection,
            message.room,
            since=message.since,
            history=message.history,
            ref=message.ref,
        )

    async def on_leave(self, message: Leave) -> None:
        await self.hub.leave(self.connection, message.room, message.ref)

    async def on_chat(self, message: SendChat) -> None:
        conn = self.connection
        room = message.room
        if room is None:
            return self._bad(
                ErrorCode.INVALID_MESSAGE, "Object missing required field `room`.", ref=message.ref
            )
        if not message.text.strip():
            return self._bad(
                ErrorCode.INVALID_MESSAGE, "`text` is blank - at `$.text`.", ref=message.ref
            )
        self._joined(room)
        max_chars = self.context.settings.max_text_chars
        if len(message.text) > max_chars:
            raise ProtocolError(
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
        conn = self.connection
        settings = self.context.settings
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
            self._error(ErrorCode.UNAUTHORIZED, exc.detail, ref=message.ref)
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
        if room not in self.connection.rooms:
            raise ProtocolError("not_joined", f"Join room {room!r} first.")

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
