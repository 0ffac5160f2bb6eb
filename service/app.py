"""Wiring: the Roomcast ASGI app, its routes and its lifespan.

from service import Roomcast
rc = Roomcast()                       # settings from the environment
app = Starlette(routes=[Mount("/rt", app=rc)], lifespan=rc.lifespan)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.routing import BaseRoute, Mount, WebSocketRoute
from starlette.types import Receive, Scope, Send

from .api import Api, not_found
from .envelopes import ClientEnvelope, Codec, ServerEnvelope, schema
from .history import open_store
from .hub import Hub
from .pages import page_routes
from .presence import open_presence
from .settings import Settings
from .sockets import PROTOCOL_HANDLERS, Handler, RoomSocket, SocketContext

E = TypeVar("E", bound=ClientEnvelope)


class Roomcast:
    """The roomcast service as an ASGI app, to serve alone or mount in your own."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_environ()
        self.hub = Hub(self.settings, open_store(self.settings), open_presence(self.settings))
        self.handlers: dict[type[ClientEnvelope], Handler] = dict(PROTOCOL_HANDLERS)
        self.server_types: list[type[ServerEnvelope]] = []
        self._app: Starlette | None = None
        self._socket: type[RoomSocket] | None = None

    def handler(self, envelope: type[E]) -> Callable[[Callable[[RoomSocket, E], Any]], Any]:
        """Register a client envelope type (a tagged `ClientEnvelope` subclass) and its handler:

        @rc.handler(Typing)
        async def typing(socket: RoomSocket, message: Typing) -> None: ...
        """
        assert self._app is None, "register envelope types before the app serves"
        assert issubclass(envelope, ClientEnvelope), f"{envelope!r} must subclass ClientEnvelope"

        def register(fn: Callable[[RoomSocket, E], Any]) -> Any:
            self.handlers[envelope] = fn
            return fn

        return register

    def server_envelope(self, envelope: type[ServerEnvelope]) -> type[ServerEnvelope]:
        """Declare a custom server envelope so that /schema.json describes it."""
        assert self._app is None, "declare envelope types before the app serves"
        self.server_types.append(envelope)
        return envelope

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
        context = SocketContext(self.hub, self.settings, Codec(extra), self.handlers)
        socket = self._socket = type("RoomSocket", (RoomSocket,), {"context": context})
        routes: list[BaseRoute] = [
            WebSocketRoute("/ws", socket),
            WebSocketRoute("/ws/{room}", socket),
            *page_routes(self.hub, self.settings, self.schema()),
            Mount("/api", app=Api(self.hub, self.settings).app()),
        ]
        return Starlette(
            routes=routes,
            lifespan=self.lifespan,
            exception_handlers={404: not_found},  # type: ignore[dict-item]
        )

    @asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
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
