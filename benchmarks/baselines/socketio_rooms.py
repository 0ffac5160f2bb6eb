"""python-socketio rooms, as its docs show them: every client enters one room
on connect, and an event a client emits is emitted to the room."""

import socketio

sio = socketio.AsyncServer(async_mode="asgi")
app = socketio.ASGIApp(sio)


@sio.event
async def connect(sid, environ):
    await sio.enter_room(sid, "bench")


@sio.on("msg")
async def msg(sid, data):
    await sio.emit("msg", data, room="bench")
