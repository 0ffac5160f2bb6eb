"""What `engine.wire` relies on in the ASGI server, checked against the installed uvicorn."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.protocols.websockets.wsproto_impl import WSProtocol

from roomcast.engine.wire import Wire, wire_for


class Transport:
    def __init__(self) -> None:
        self.aborted = 0

    def abort(self) -> None:
        self.aborted += 1


class Protocol:
    """Shaped like uvicorn's: owns the transport, runs the app in a method coroutine."""

    def __init__(self) -> None:
        self.transport = Transport()
        self.wire: Wire | None = None

    async def send(self, message: Any) -> None:
        pass

    async def run_asgi(self, wrap: bool) -> None:
        send = self.send
        if wrap:

            async def wrapped(message: Any) -> None:  # a host app's middleware
                await send(message)

            scope = {"roomcast.server_send": wrapped}
            self.wire = wire_for(scope, wrapped, fast=True)
        else:
            self.wire = wire_for({"roomcast.server_send": send}, send, fast=True)


def test_uvicorn_still_has_what_the_wire_relies_on() -> None:
    """The app runs in `self.run_asgi()`, `send` is a coroutine method of the protocol
    object, and that object keeps the connection's transport as `self.transport`."""
    for protocol in (WebSocketsSansIOProtocol, WSProtocol):
        assert inspect.iscoroutinefunction(protocol.run_asgi), protocol
        assert inspect.iscoroutinefunction(protocol.send), protocol
        source = inspect.getsource(protocol)
        assert "self.transport = transport" in source, protocol
        assert "create_task(self.run_asgi())" in source, protocol


async def test_abort_found_through_the_servers_own_send() -> None:
    protocol = Protocol()
    await asyncio.create_task(protocol.run_asgi(wrap=False))
    assert protocol.wire is not None
    protocol.wire.abort()
    assert protocol.transport.aborted == 1


async def test_abort_found_under_middleware_that_wraps_send() -> None:
    protocol = Protocol()
    await asyncio.create_task(protocol.run_asgi(wrap=True))
    assert protocol.wire is not None
    protocol.wire.abort()
    assert protocol.transport.aborted == 1


async def test_a_send_that_finishes_at_once_is_written_inline() -> None:
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    assert Wire(send).write("hi") is None
    assert sent == [{"type": "websocket.send", "text": "hi"}]


async def test_a_send_that_waits_is_handed_back_to_finish() -> None:
    gate = asyncio.Event()
    sent: list[Any] = []

    async def send(message: Any) -> None:
        await gate.wait()
        sent.append(message)

    unfinished = Wire(send).write("later")
    assert unfinished is not None and sent == []
    task = asyncio.ensure_future(unfinished)
    gate.set()
    await asyncio.wait_for(task, 2)
    assert sent == [{"type": "websocket.send", "text": "later"}]
