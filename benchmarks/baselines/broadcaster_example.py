"""encode/broadcaster's README chat example, as written, less the HTML page.

Two changes the installed versions force: Starlette 1.x has no `on_startup`/
`on_shutdown` (a lifespan does the same), and the backend comes from
BROADCAST_URL as in broadcaster's own `example/app.py` (memory:// by default)
instead of a hard-coded Redis URL. Type hints are added for mypy --strict, which
changes nothing at run time.
"""

import os
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

from broadcaster import Broadcast, Event
from starlette.applications import Starlette
from starlette.concurrency import run_until_first_complete
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

broadcast = Broadcast(os.environ.get("BROADCAST_URL", "memory://"))


async def chatroom_ws(websocket: WebSocket) -> None:
    await websocket.accept()
    await run_until_first_complete(
        (chatroom_ws_receiver, {"websocket": websocket}),
        (chatroom_ws_sender, {"websocket": websocket}),
    )


async def chatroom_ws_receiver(websocket: WebSocket) -> None:
    async for message in websocket.iter_text():
        await broadcast.publish(channel="chatroom", message=message)


async def chatroom_ws_sender(websocket: WebSocket) -> None:
    async with broadcast.subscribe(channel="chatroom") as subscriber:
        # broadcaster hints Subscriber.__aiter__ as `AsyncGenerator[Event | None] | None`;
        # it is an async generator of Events (it ends on unsubscribe, never yields None).
        async for event in cast(AsyncIterable[Event], subscriber):
            await websocket.send_text(event.message)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    await broadcast.connect()
    yield
    await broadcast.disconnect()


routes = [
    WebSocketRoute("/", chatroom_ws, name="chatroom_ws"),
]

app = Starlette(routes=routes, lifespan=lifespan)
