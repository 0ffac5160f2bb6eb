"""Wiring: the Roomcast ASGI app, its routes, its lifespan, and what user code calls.

from roomcast import Roomcast
rc = Roomcast()                       # settings from the environment
app = Starlette(routes=[Mount("/rt", app=rc)], lifespan=rc.lifespan)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.routing import BaseRoute, Mount, WebSocketRoute
from starlette.types import Receive, Scope, Send

from .backends.broker.factory import open_broker
from .backends.history.base import Appended
from .backends.history.factory import open_store
from .backends.presence.factory import open_presence
from .engine.hub import Hub
from .engine.limits import ConnectRate
from .engine.wire import fast_writes_available
from .protocol.codec import Codec
from .protocol.codes import Close
from .protocol.envelopes import ClientEnvelope, Envelope, Level, ServerEnvelope
from .protocol.schema import schema
from .settings import Settings
from .web.api import Api, not_found
from .web.hooks import Hooks
from .web.http_hooks import HttpHooks
from .web.pages import page_routes
from .web.sockets import PROTOCOL_HANDLERS, Handler, RoomSocket, SocketContext

log = logging.getLogger("roomcast")

HandlerT = TypeVar("HandlerT", bound=Callable[[RoomSocket, Any], Awaitable[None]])
ServerT = TypeVar("ServerT", bound=type[ServerEnvelope])
SocketHookT = TypeVar("SocketHookT", bound=Callable[[RoomSocket], Awaitable[None]])
RoomHookT = TypeVar("RoomHookT", bound=Callable[[RoomSocket, str], Awaitable[None]])
ChatHookT = TypeVar("ChatHookT", bound=Callable[[RoomSocket | None, str, str], Awaitable[str]])


class Roomcast:
    """The roomcast service as an ASGI app, to serve alone or mount in your own."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings = settings or Settings.from_environ()
        self.hub = Hub(
            settings,
            open_store(
                settings.history_url,
                settings.history_size,
                settings.history_ttl,
                settings.history_memory_mb,
            ),
            open_presence(settings.broadcast_url, settings.history_url, settings.presence_ttl),
            open_broker(settings.broadcast_url),
        )
        self.handlers: dict[type[ClientEnvelope], Handler] = dict(PROTOCOL_HANDLERS)
        self.server_types: list[type[ServerEnvelope]] = []
        self.hooks: Hooks[RoomSocket] = Hooks(settings.hook_timeout)
        # CONNECT_HOOK_URL, JOIN_HOOK_URL, CHAT_HOOK_URL: hooks like the application's own.
        self.http_hooks = HttpHooks.register(settings, self.hooks)
        self._app: Starlette | None = None
        self._socket: type[RoomSocket] | None = None

    # --- what an application adds ----------------------------------------

    def handler(self, envelope: type[ClientEnvelope]) -> Callable[[HandlerT], HandlerT]:
        """Register a client envelope type (a tagged `ClientEnvelope` subclass) and its handler:

        @rc.handler(Typing)
        async def typing(socket: RoomSocket, message: Typing) -> None: ...
        """
        self._not_serving("register envelope types")
        if not (isinstance(envelope, type) and issubclass(envelope, ClientEnvelope)):
            raise TypeError(f"{envelope!r} must be a subclass of roomcast.ClientEnvelope")

        def register(fn: HandlerT) -> HandlerT:
            self.handlers[envelope] = fn
            return fn

        return register

    def server_envelope(self, envelope: ServerT) -> ServerT:
        """Declare a custom server envelope so that /schema.json describes it."""
        self._not_serving("declare envelope types")
        if not (isinstance(envelope, type) and issubclass(envelope, ServerEnvelope)):
            raise TypeError(f"{envelope!r} must be a subclass of roomcast.ServerEnvelope")
        self.server_types.append(envelope)
        return envelope

    def on_connect(self, hook: SocketHookT) -> SocketHookT:
        """Run `hook(socket)` before a connection's `welcome`: read `socket.headers`,
        `.cookies`, `.query_params`, `.scope`; set `socket.user`; raise `Refuse` to refuse."""
        self._not_serving("register hooks")
        self.hooks.connect.append(hook)
        return hook

    def on_join(self, hook: RoomHookT) -> RoomHookT:
        """Run `hook(socket, room)` before a join (on `/ws/{room}`, before the `welcome`);
        raise `ProtocolError` to refuse it."""
        self._not_serving("register hooks")
        self.hooks.join.append(hook)
        return hook

    def on_chat(self, hook: ChatHookT) -> ChatHookT:
        """Run `hook(socket, room, text)` before a chat is stored (`socket` is None for a
        chat published through the HTTP API); it returns the text to store, or raises
        `ProtocolError` to refuse the chat."""
        self._not_serving("register hooks")
        self.hooks.chat.append(hook)
        return hook

    def on_leave(self, hook: RoomHookT) -> RoomHookT:
        """Run `hook(socket, room)` after a connection left a room (also when it ended)."""
        self._not_serving("register hooks")
        self.hooks.leave.append(hook)
        return hook

    def on_disconnect(self, hook: SocketHookT) -> SocketHookT:
        """Run `hook(socket)` after an admitted connection ended (after its leave hooks)."""
        self._not_serving("register hooks")
        self.hooks.disconnect.append(hook)
        return hook

    def _not_serving(self, what: str) -> None:
        if self._app is not None:
            raise RuntimeError(f"{what} before the app serves its first request")

    # --- what an application calls ---------------------------------------

    async def publish(
        self,
        room: str,
        *,
        title: str,
        body: str,
        level: Level = "info",
        data: Any = None,
        ref: str | None = None,
    ) -> Appended:
        """Store a notification in `room` (the room's next offset) and deliver it to every
        member, on every worker. A repeated `ref` returns the first and publishes nothing."""
        return await self.hub.publisher.publish(
            room, title=title, body=body, level=level, data=data, ref=ref
        )

    async def broadcast(self, room: str, envelope: Envelope) -> None:
        """Deliver an ephemeral envelope (not stored, no offset) to the room's members."""
        await self.hub.publisher.broadcast(room, envelope)

    async def notify_user(
        self, user_id: str, *, title: str, body: str, level: Level = "info", data: Any = None
    ) -> int:
        """Send a notification to each connection of one user, on every worker; returns how
        many connections it reached."""
        return await self.hub.publisher.notify_user(
            user_id, title=title, body=body, level=level, data=data
        )

    async def disconnect_user(self, user_id: str, code: int = Close.UNAUTHORIZED) -> int:
        """Close every connection of one user (with 4401 unless told otherwise), on every
        worker; returns how many there were."""
        return await self.hub.publisher.disconnect_user(user_id, code)

    # --- serving ---------------------------------------------------------

    def schema(self) -> dict[str, Any]:
        extra = [t for t in self.handlers if t not in PROTOCOL_HANDLERS]
        return schema(extra, self.server_types)

    @property
    def app(self) -> Starlette:
        if self._app is None:
            self._app = self._build()
        return self._app

    def _build(self) -> Starlette:
        extra = [t for t in self.handlers if t not in PROTOCOL_HANDLERS]
        fast, why = fast_writes_available()
        if self.settings.fast_writes == "off":
            fast, why = False, "FAST_WRITES=off"
        log.info(
            "writes: %s", f"fast where possible ({why})" if fast else f"ASGI send only ({why})"
        )
        rate = ConnectRate(self.settings.connect_rate)
        context = SocketContext(
            self.hub, self.settings, Codec(extra), self.handlers, fast, self.hooks, rate
        )
        socket = self._socket = type("RoomSocket", (RoomSocket,), {"context": context})
        routes: list[BaseRoute] = [
            WebSocketRoute("/ws", socket),
            WebSocketRoute("/ws/{room}", socket),
            *page_routes(self.hub, self.settings, self.schema()),
            Mount("/api", app=Api(self.hub, self.settings, self.hooks).app()),
        ]
        return Starlette(
            routes=routes,
            lifespan=self.lifespan,
            exception_handlers={404: not_found},  # type: ignore[dict-item]
        )

    @asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        async with self.http_hooks:
            await self.hub.start()
            try:
                yield
            finally:
                await self.hub.stop()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self.app
        if scope["type"] == "websocket":
            # The server's own `send`, before any middleware wraps it: the
            # slow-consumer close uses it to drop a client that never reads.
            scope.setdefault("roomcast.server_send", send)
            params = _socket_params(_route_path(scope))
            if params is not None and self._socket is not None:
                # Straight to the endpoint: the router's and middleware's coroutines
                # would stay suspended under every connection for its whole life
                # (about 3 KiB each; benchmarks/README.md, idle memory).
                scope["path_params"] = params
                await self._socket(scope, receive, send)
                return
        await app(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path below where this app is mounted (as Starlette's router sees it)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("/", ""):
        return path[len(root) :]
    return path


def _socket_params(path: str) -> dict[str, str] | None:
    """The path parameters of `/ws` and `/ws/{room}`, or None for another path."""
    if path == "/ws":
        return {}
    room = path[4:] if path.startswith("/ws/") else ""
    return {"room": room} if room and "/" not in room else None


def create_app() -> Roomcast:
    """The service with settings from the environment (uvicorn's factory)."""
    return Roomcast()
