"""python-socketio rooms, as its docs show them: every client enters one room
on connect, and an event a client emits is emitted to the room."""

from typing import Any

import socketio

sio = socketio.AsyncServer(async_mode="asgi")
app = socketio.ASGIApp(sio)


# python-socketio ships no type hints: its decorators are untyped.
@sio.event  # type: ignore[untyped-decorator]
async def connect(sid: str, environ: dict[str, Any]) -> None:
    await sio.enter_room(sid, "bench")


@sio.on("msg")  # type: ignore[untyped-decorator]
async def msg(sid: str, data: Any) -> None:
    await sio.emit("msg", data, room="bench")
