"""A client that stops reading is closed with 4408 and costs the others nothing."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import socket
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import ClientConnection, connect

from ..servers import Server, start_app, start_server
from ..support import counts

TEXT_CHARS = 60_000
MESSAGES = 200  # 200 x 60 kB: far more than the kernel and uvicorn buffer for one socket
OUTBOX = 16
WINDOW = 4  # the publisher stays at most this far ahead of the readers that keep up


SLOW_ENV = {
    "OUTBOX_SIZE": str(OUTBOX),
    "MAX_TEXT_CHARS": str(TEXT_CHARS),
    "MAX_MESSAGE_BYTES": str(TEXT_CHARS + 1000),
    "RATE_LIMIT": "100000",
}


@pytest.fixture(
    scope="module",
    params=["serve", "serve-shared", "serve-per-connection", "mounted-behind-middleware"],
)
def slow_server(request: pytest.FixtureRequest) -> Iterator[Server]:
    """`roomcast serve` under each WS_COMPRESSION (members alternate between clients that
    offer deflate and clients that do not), and roomcast mounted in a host app whose
    middleware wraps `send` (the TCP drop of a client that never reads must work there too)."""
    if request.param == "mounted-behind-middleware":
        srv = start_app("tests.hostapp:app", "/rt", SLOW_ENV)
    else:
        compression = request.param.removeprefix("serve").removeprefix("-") or "off"
        srv = start_server({**SLOW_ENV, "WS_COMPRESSION": compression})
    yield srv
    srv.terminate()


def stalled_socket(server: Server, path: str, deflate: bool = False) -> socket.socket:
    """A WebSocket handshake over a raw socket that then never reads again (offering
    permessage-deflate as browsers do, when told)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {server.prefix}{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            + (
                "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
                if deflate
                else ""
            )
            + "\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(1)
        assert chunk, "server closed during the handshake"
        response += chunk
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


class Readers:
    """Members that read everything; the publisher waits for them to stay within WINDOW."""

    def __init__(self, members: list[ClientConnection]) -> None:
        self.counts = [0] * len(members)
        self.progress = asyncio.Condition()
        self.tasks = [asyncio.create_task(self._read(i, m)) for i, m in enumerate(members)]

    async def _read(self, index: int, ws: ClientConnection) -> list[int]:
        offsets: list[int] = []
        while len(offsets) < MESSAGES:
            frame = json.loads(await ws.recv())
            if frame["type"] == "chat":
                offsets.append(frame["offset"])
                async with self.progress:
                    self.counts[index] = len(offsets)
                    self.progress.notify_all()
        return offsets

    async def publish(self, publisher: ClientConnection, text: str) -> None:
        for sent in range(MESSAGES):
            async with self.progress:
                await self.progress.wait_for(lambda: min(self.counts) >= sent - WINDOW)  # noqa: B023
            await publisher.send(text)

    async def results(self) -> list[list[int]]:
        return await asyncio.gather(*self.tasks)


async def open_member(server: Server, room: str, deflate: bool) -> ClientConnection:
    compression = "deflate" if deflate else None
    ws = await connect(f"{server.ws}/ws/{room}", max_size=None, compression=compression)
    assert json.loads(await ws.recv())["type"] == "welcome"
    assert json.loads(await ws.recv())["type"] == "joined"
    return ws


def incompressible(chars: int) -> str:
    """Text that deflate barely shrinks: what fills a stalled client's buffers must do so
    whether or not its frames are compressed."""
    return secrets.token_urlsafe(chars)[:chars]


async def wait_for_connections(server: Server, count: int, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while counts(server)["connections"] != count:
            await asyncio.sleep(0.05)  # polling /metrics, bounded by the timeout


async def test_stalled_client_is_dropped_and_others_get_everything(slow_server: Server) -> None:
    room = "stall"
    stalled = stalled_socket(slow_server, f"/ws/{room}", deflate=True)
    try:
        async with asyncio.timeout(60):
            members = [await open_member(slow_server, room, n % 2 == 0) for n in range(3)]
            await wait_for_connections(slow_server, 4, 10)
            readers = Readers(members)
            await readers.publish(members[0], incompressible(TEXT_CHARS))
            for offsets in await readers.results():
                assert offsets == list(range(1, MESSAGES + 1))
            # The stalled one is gone from the server: connection, membership, presence.
            await wait_for_connections(slow_server, 3, 20)
            await members[1].send(json.dumps({"type": "presence", "room": room, "ref": "p"}))
            while (frame := json.loads(await members[1].recv()))["type"] != "presence":
                pass
            assert frame["online"] == 3
            # Its socket really ends: reading now reaches EOF or a reset, not endless data.
            stalled.settimeout(10)
            with pytest.raises((ConnectionResetError, EOFError)):
                while stalled.recv(1 << 20):
                    pass
                raise EOFError
            for m in members:
                await m.close()
            assert "no way to drop a TCP connection" not in slow_server.log()
    finally:
        stalled.close()


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """One unmasked server frame: (opcode, payload)."""

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise EOFError("connection closed without a close frame")
            data += chunk
        return data

    first, second = exactly(2)
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(exactly(2), "big")
    elif length == 127:
        length = int.from_bytes(exactly(8), "big")
    return first & 0x0F, exactly(length)


async def test_slow_reader_gets_4408_and_a_gapless_prefix(slow_server: Server) -> None:
    room = "slow"
    slow = stalled_socket(slow_server, f"/ws/{room}")
    try:
        async with asyncio.timeout(60):
            fast = await open_member(slow_server, room, True)
            publisher = await open_member(slow_server, room, False)
            await wait_for_connections(slow_server, 3, 10)
            readers = Readers([fast, publisher])
            await readers.publish(publisher, incompressible(TEXT_CHARS))
            for offsets in await readers.results():
                assert offsets == list(range(1, MESSAGES + 1))
            # Now it reads again: what was queued, then the close frame with 4408.
            slow.settimeout(20)
            seen: list[int] = []
            while (frame := await asyncio.to_thread(read_frame, slow))[0] != 0x8:
                envelope = json.loads(frame[1])
                if envelope["type"] == "chat":
                    seen.append(envelope["offset"])
            assert int.from_bytes(frame[1][:2], "big") == 4408
            # What it did get is a gapless prefix: it can recover the rest by offset.
            assert seen == list(range(1, len(seen) + 1))
            assert len(seen) < MESSAGES
            await fast.close()
            await publisher.close()
            await wait_for_connections(slow_server, 0, 20)
    finally:
        slow.close()
