"""The byte stream one client gets under load: whole frames only. uvicorn's pings and the
close frame go out between prepared frames, never inside one; a client that stops
reading and reads again gets every frame, in order, as the path switches to the queue."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from ..rawws import RawWebSocket
from ..servers import Server, start_server

PING, PONG, CLOSE, TEXT = 0x9, 0xA, 0x8, 0x1


async def publisher(server: Server, room: str) -> ClientConnection:
    ws = await connect(f"{server.ws}/ws/{room}", max_size=None)
    assert json.loads(await ws.recv())["type"] == "welcome"
    assert json.loads(await ws.recv())["type"] == "joined"
    return ws


async def drain(ws: ClientConnection) -> None:
    """A publisher reads its acks, or it would be the slow consumer."""
    with contextlib.suppress(ConnectionClosed):
        async for _ in ws:
            pass


async def pour(ws: ClientConnection, room: str, stop: asyncio.Event, text: str) -> int:
    sent = 0
    while not stop.is_set():
        for _ in range(20):  # a burst per loop turn
            await ws.send(json.dumps({"type": "chat", "room": room, "text": text}))
            sent += 1
        await asyncio.sleep(0.005)  # pacing, so that this client still answers pings in time
    return sent


def read_under_burst(raw: RawWebSocket, deadline: float) -> tuple[int, list[int]]:
    """Read whole frames until 3 pings (answered) and 1,000 chats came: (pings, offsets)."""
    offsets: list[int] = []
    pings = 0
    while pings < 3 or len(offsets) < 1000:  # pings every 2 s, under a burst
        frame = raw.read_frame(deadline)
        assert frame is not None, "the server closed the connection"
        opcode, payload = frame
        if opcode == PING:
            pings += 1
            raw.send(PONG, payload)
            continue
        assert opcode == TEXT, frame
        envelope = json.loads(payload)  # a split frame would not parse
        if envelope["type"] == "chat":
            offsets.append(envelope["offset"])
    return pings, offsets


@pytest.fixture
async def pinging() -> AsyncIterator[Server]:
    server = start_server({"HEARTBEAT_SECONDS": "2", "RATE_LIMIT": "1000000", "CONNECT_RATE": "0"})
    try:
        yield server
    finally:
        server.terminate()


@pytest.mark.slow
async def test_pings_and_the_close_frame_never_split_a_frame(pinging: Server) -> None:
    room = "stream"
    raw = RawWebSocket(pinging.port, f"/ws/{room}")
    try:
        deadline = time.monotonic() + 30
        for kind in ("welcome", "joined"):
            opcode, payload = await asyncio.to_thread(raw.read_frame, deadline)  # type: ignore[misc]
            assert (opcode, json.loads(payload)["type"]) == (TEXT, kind)
        sender = await publisher(pinging, room)
        reading = asyncio.create_task(drain(sender))
        stop = asyncio.Event()
        pouring = asyncio.create_task(pour(sender, room, stop, "y" * 300))
        # One thread reads the whole phase and answers pings at once: a thread hop per frame
        # would fall behind the burst, and a ping seen after HEARTBEAT_SECONDS drops us.
        pings, offsets = await asyncio.to_thread(read_under_burst, raw, deadline)
        assert pings >= 3 and len(offsets) >= 1000
        stop.set()
        await asyncio.wait_for(pouring, 10)
        pinging.terminate()  # SIGTERM: every socket gets 1012
        while True:
            frame = await asyncio.to_thread(raw.read_frame, deadline)
            assert frame is not None, "closed without a close frame"
            if frame[0] == CLOSE:
                assert int.from_bytes(frame[1][:2], "big") == 1012
                break
            if frame[0] == TEXT:
                envelope = json.loads(frame[1])
                if envelope["type"] == "chat":
                    offsets.append(envelope["offset"])
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
        reading.cancel()
    finally:
        raw.close()


def asgi_writes(server: Server) -> float:
    with urllib.request.urlopen(server.http + "/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith('roomcast_writes_total{path="asgi"}'):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no roomcast_writes_total in /metrics")


@pytest.mark.slow
async def test_a_reader_that_pauses_and_resumes_gets_every_frame_in_order() -> None:
    server = start_server(
        {
            "RATE_LIMIT": "100000",
            "CONNECT_RATE": "0",
            "OUTBOX_SIZE": "900",
            "MAX_TEXT_CHARS": "60000",
            "MAX_MESSAGE_BYTES": "61000",
        }
    )
    room = "pause"
    raw = RawWebSocket(server.port, f"/ws/{room}", rcvbuf=4096)
    try:
        deadline = time.monotonic() + 60
        for _ in range(2):  # welcome, joined
            assert await asyncio.to_thread(raw.read_frame, deadline) is not None
        sender = await publisher(server, room)
        reading = asyncio.create_task(drain(sender))
        before = asgi_writes(server)
        # The reader reads nothing meanwhile: kernel buffers fill, the transport pauses,
        # and what follows waits in the connection's queue (written through ASGI send).
        count = 150  # 9 MB: more than the kernel buffers of a loopback socket
        for n in range(count):
            text = f"{n:03d}" * 20000
            await sender.send(json.dumps({"type": "chat", "room": room, "text": text}))
        while asgi_writes(server) <= before:
            assert time.monotonic() < deadline, "the transport never paused"
            await asyncio.sleep(0.05)  # polling /metrics, bounded by the deadline
        texts: list[str] = []
        while len(texts) < count:
            frame = await asyncio.to_thread(raw.read_frame, deadline)
            assert frame is not None and frame[0] == TEXT, frame
            envelope = json.loads(frame[1])
            if envelope["type"] == "chat":
                texts.append(envelope["text"][:3])
        assert texts == [f"{n:03d}" for n in range(count)]
        reading.cancel()
        await sender.close()
    finally:
        raw.close()
        server.terminate()
