"""A host Starlette app that mounts roomcast at /rt, as the README's example does, behind a
middleware that wraps `send` (as host apps' middleware does): `uvicorn tests.hostapp:app`."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from roomcast import Roomcast


class CountSends:
    """Counts what the app sends: it stands between roomcast and the server's `send`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.sent = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counted(message: Message) -> None:
            self.sent += 1
            await send(message)

        await self.app(scope, receive, counted)


rc = Roomcast()
app = Starlette(
    routes=[Mount("/rt", app=rc)], lifespan=rc.lifespan, middleware=[Middleware(CountSends)]
)
