"""The floor of the ASGI path: a list of connections and a sequential `await send`.

No framework, no outbox, no limits: what uvicorn itself costs per delivery.
"""

from __future__ import annotations

from typing import Any

Send = Any

connections: list[Send] = []


async def app(scope: dict[str, Any], receive: Any, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            event = (await receive())["type"]
            await send({"type": event + ".complete"})
            if event == "lifespan.shutdown":
                return
    assert scope["type"] == "websocket"
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    connections.append(send)
    try:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is not None:
                out = {"type": "websocket.send", "text": text}
                for peer in connections:
                    await peer(out)
    finally:
        connections.remove(send)
