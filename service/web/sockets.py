"""The WebSocket edges: `/ws` (multiplexed) and `/ws/{room}`.

A connection passes `handshake.admit` before its `welcome`. Each frame is then
checked against the connection's limits, decoded once with the app's decoder
and dispatched on its type; answers go through the connection's outbox,
never straight to the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgspec
from starlette.endpoints import WebSocketEndpoint
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..engine.connection import Connection
from ..engine.hub import Hub
from ..engine.limits import ConnectRate, Verdict
from ..engine.wire import wire_for
from ..errors import ProtocolError, Refuse
from ..observe import metrics
from ..protocol.codec import TOO_DEEP, Codec, encode, ref_of, salvage
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
from .auth import Unauthorized, room_permitted, timer_at, verify_token
from .handshake import ROOM_RULE, Attempt, admit, join_query, refusal_reason, subprotocol_of
from .hooks import Hooks, checked_user
from .upgrade import UpgradeRequest

log = logging.getLogger("roomcast.sockets")

Handler = Callable[["RoomSocket", Any], Awaitable[None]]


@dataclass(slots=True)
class SocketContext:
    """What the endpoints share within one app: built once, used for every frame."""

    hub: Hub
    settings: Settings
    codec: Codec
    handlers: dict[type[ClientEnvelope], Handler] = field(default_factory=dict)
    fast_writes: bool = False  # prepared frames straight to the server's transport
    hooks: Hooks[RoomSocket] = field(default_factory=lambda: Hooks(5.0))
    connect_rate: ConnectRate = field(default_factory=lambda: ConnectRate(0))


class RoomSocket(UpgradeRequest, WebSocketEndpoint):
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
    _identity: User | None = None  # until the connection is admitted

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
        """Who is connected: the token's user, the anonymous identity, or whom an
        on_connect hook set (presence and `welcome` show that one)."""
        if self.conn is not None:
            return self.conn.user
        if self._identity is None:
            raise RuntimeError("this socket is not connected (it was refused, or not yet)")
        return self._identity

    @user.setter
    def user(self, user: User) -> None:
        if self.conn is not None or self._identity is None:
            raise RuntimeError("set socket.user in an on_connect hook, before the `welcome`")
        self._identity = checked_user(user, self.context.settings.max_name_chars)

    @property
    def rooms(self) -> frozenset[str]:
        """The rooms this connection has joined."""
        return frozenset(self.conn.rooms) if self.conn is not None else frozenset()

    def reply(self, envelope: Envelope) -> None:
        """Queue an envelope for this connection (for custom handlers)."""
        self.connection.send(encode(envelope))

    # --- connect ---------------------------------------------------------

    async def on_connect(self, websocket: WebSocket) -> None:
        settings, hub = self.context.settings, self.context.hub
        offered: list[str] = list(websocket.scope.get("subprotocols", ()))
        subprotocol = subprotocol_of(offered)
        self.room = websocket.path_params.get("room")
        query = websocket.query_params
        attempt = Attempt.of(websocket.client, self.context.connect_rate)
        hooks = self.context.hooks
        try:
            count = len(hub.connections) + hooks.admitting  # those in connect hooks count too
            admission = admit(
                settings, count, attempt, websocket.headers, query, offered, self.room
            )
            self._identity = admission.user
            if hooks.at_connect(self.room):
                await hooks.admit(self, self.room)
        except Refuse as refusal:
            metrics.refused(refusal_reason(refusal))
            # A browser cannot read a refused handshake's status: accept, explain, close.
            with contextlib.suppress(WebSocketDisconnect):  # it left (a slow connect hook)
                await websocket.accept(subprotocol=subprotocol)
                await websocket.send_text(encode(Error(code=refusal.error, detail=refusal.detail)))
                metrics.error_sent(refusal.error)
                await websocket.close(refusal.code)
            return
        user = self._identity
        self.permitted, self.token_expires = admission.permitted, admission.expires
        conn = Connection(
            secrets.token_hex(8),
            user,
            wire_for(websocket.scope, self.send, self.context.fast_writes),
            limit=settings.outbox_size,
            rate=settings.rate_limit,
            on_overflow=hub.on_overflow,
        )
        # Counted before the accept awaits, so MAX_CONNECTIONS holds under a burst of connects.
        self.conn = conn
        hub.attach(conn)
        try:
            await websocket.accept(subprotocol=subprotocol)
        except BaseException:  # it left first: on_disconnect will not run for this socket
            await hub.detach(conn)
            raise
        conn.send(encode(Welcome(conn=conn.id, user=user, heartbeat=settings.heartbeat_seconds)))
        conn.start()
        self._schedule_expiry()
        if self.room is not None:
            await self._auto_join(self.room, query.get("since"), query.get("history"))

    def _schedule_expiry(self) -> None:
        """(Re)arm the timer that closes the connection at its token's `exp`."""
        self._expiry = timer_at(self._expiry, self.token_expires, self._expire)

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
        # The join hooks approved this room before the `welcome`.
        await self._run(RoomSocket._join_approved, Join(room=room, since=since, history=history))

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
            except RecursionError:
                metrics.IN_OTHER.inc()
                return self._bad(ErrorCode.INVALID_MESSAGE, f"{TOO_DEEP}.")
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
        except Refuse as refusal:  # a hook or handler ends the connection
            self._error(refusal.error, refusal.detail, ref=message.ref)
            self.connection.close_after_queued(refusal.code)
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
            self.conn.send(encode(Error(code=code, detail=detail, ref=ref, room=room)))

    # --- handlers of the protocol's requests -----------------------------

    async def on_join(self, message: Join) -> None:
        if not room_permitted(message.room, self.permitted):
            raise ProtocolError("forbidden", f"Your token does not permit room {message.room!r}.")
        hooks = self.context.hooks
        if hooks.join and message.room not in self.connection.rooms:
            self.hub.check_room_limit(self.connection)
            await hooks.authorize(self, message.room)
        await self._join_approved(message)

    async def _join_approved(self, message: Join) -> None:
        await self.hub.join(
            self.connection,
            message.room,
            since=message.since,
            history=message.history,
            ref=message.ref,
        )

    async def on_leave(self, message: Leave) -> None:
        await self._leave(message.room, message.ref)

    async def _leave(self, room: str, ref: str | None) -> None:
        member = room in self.connection.rooms
        await self.hub.leave(self.connection, room, ref)
        if member:
            await self.context.hooks.notify("leave", self.context.hooks.leave, self, room)

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
        text = message.text
        if self.context.hooks.chat:
            text = await self.context.hooks.moderate(self, room, text, max_chars)
        appended = await self.hub.publisher.chat(conn.user, room, text, message.ref)
        conn.send(encode(Ack(ref=message.ref, room=room, offset=appended.offset)))

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
                await self._leave(room, message.ref)

    async def on_ping(self, message: Ping) -> None:
        self.reply(Pong(ref=message.ref))

    def _joined(self, room: str) -> None:
        if room not in self.connection.rooms:
            raise ProtocolError("not_joined", f"Join room {room!r} first.")

    # --- disconnect ------------------------------------------------------

    async def on_disconnect(self, websocket: WebSocket, close_code: int) -> None:
        self._expiry = timer_at(self._expiry, None, self._expire)
        conn = self.conn
        if conn is not None:
            rooms = sorted(conn.rooms)
            await self.hub.detach(conn)
            await self.context.hooks.departed(self, rooms)


PROTOCOL_HANDLERS: dict[type[ClientEnvelope], Handler] = {
    Join: RoomSocket.on_join,
    Leave: RoomSocket.on_leave,
    SendChat: RoomSocket.on_chat,
    GetPresence: RoomSocket.on_presence,
    Refresh: RoomSocket.on_refresh,
    Ping: RoomSocket.on_ping,
}
