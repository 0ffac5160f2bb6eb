"""encode/broadcaster's README chat example, as written, less the HTML page.

Two changes the installed versions force: Starlette 1.x has no `on_startup`/
`on_shutdown` (a lifespan does the same), and the backend comes from
BROADCAST_URL as in broadcaster's own `example/app.py` (memory:// by default)
instead of a hard-coded Redis URL.
"""

import os
from contextlib import asynccontextmanager

from broadcaster import Broadcast
from starlette.applications import Starlette
from starlette.concurrency import run_until_first_complete
from starlette.routing import WebSocketRoute

broadcast = Broadcast(os.environ.get("BROADCAST_URL", "memory://"))


async def chatroom_ws(websocket):
    await websocket.accept()
    await run_until_first_complete(
        (chatroom_ws_receiver, {"websocket": websocket}),
        (chatroom_ws_sender, {"websocket": websocket}),
    )


async def chatroom_ws_receiver(websocket):
    async for message in websocket.iter_text():
        await broadcast.publish(channel="chatroom", message=message)


async def chatroom_ws_sender(websocket):
    async with broadcast.subscribe(channel="chatroom") as subscriber:
        async for event in subscriber:
            await websocket.send_text(event.message)


@asynccontextmanager
async def lifespan(app):
    await broadcast.connect()
    yield
    await broadcast.disconnect()


routes = [
    WebSocketRoute("/", chatroom_ws, name="chatroom_ws"),
]

app = Starlette(routes=routes, lifespan=lifespan)
