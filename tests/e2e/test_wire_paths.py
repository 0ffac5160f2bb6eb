"""Every way out delivers the same frames: the fast path (prepared frames straight to
uvicorn's websockets-sansio transport, plain or shared-compressed), and the ASGI path it
falls back to (FAST_WRITES=off, uvicorn's other WebSocket implementations, a host app's
middleware, another ASGI server), for clients that negotiate deflate and clients that do not.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from ..brokers import free_port
from ..servers import Server, start_app, start_hypercorn, start_server

BURST = 150
ENV = {"RATE_LIMIT": "100000", "CONNECT_RATE": "0"}

# name -> (how to start it, whether prepared frames may go straight to the transport)
SERVERS: dict[str, tuple[Any, bool]] = {
    "serve": (lambda: start_server(ENV), True),
    "serve-shared": (lambda: start_server({**ENV, "WS_COMPRESSION": "shared"}), True),
    "serve-per-connection": (
        lambda: start_server({**ENV, "WS_COMPRESSION": "per-connection"}),
        True,  # for the clients that did not negotiate deflate
    ),
    "fast-writes-off": (lambda: start_server({**ENV, "FAST_WRITES": "off"}), False),
    "uvicorn-wsproto": (lambda: start_app("tests.hostapp:rc", "", ENV, ["--ws", "wsproto"]), False),
    "uvicorn-websockets": (
        lambda: start_app("tests.hostapp:rc", "", ENV, ["--ws", "websockets"]),
        False,
    ),
    "mounted-behind-middleware": (lambda: start_app("tests.hostapp:app", "/rt", ENV), False),
    "hypercorn": (lambda: start_hypercorn("tests.hostapp:rc", free_port(), ENV), False),
}


@pytest.fixture(scope="module", params=sorted(SERVERS))
def any_server(request: pytest.FixtureRequest) -> Iterator[tuple[Server, bool]]:
    start, fast = SERVERS[request.param]
    server = start()
    yield server, fast
    server.terminate()


def writes(server: Server) -> dict[str, float]:
    with urllib.request.urlopen(server.http + "/metrics", timeout=5) as response:
        text = response.read().decode()
    found = {"fast": 0.0, "asgi": 0.0}
    for line in text.splitlines():
        if line.startswith("roomcast_writes_total{"):
            path = line.split('path="')[1].split('"')[0]
            found[path] = float(line.rsplit(" ", 1)[1])
    return found


async def member(server: Server, room: str, deflate: bool) -> ClientConnection:
    ws = await connect(
        f"{server.ws}/ws/{room}", compression="deflate" if deflate else None, max_size=None
    )
    assert json.loads(await ws.recv())["type"] == "welcome"
    assert json.loads(await ws.recv())["type"] == "joined"
    return ws


async def chats(ws: ClientConnection, count: int) -> list[tuple[int, str]]:
    got: list[tuple[int, str]] = []
    while len(got) < count:
        frame = json.loads(await ws.recv())
        if frame["type"] == "chat":
            got.append((frame["offset"], frame["text"]))
    return got


@pytest.mark.slow
@pytest.mark.parametrize("deflate", [True, False], ids=["deflate-client", "plain-client"])
async def test_a_burst_arrives_whole_and_in_order_on_every_path(
    any_server: tuple[Server, bool], deflate: bool
) -> None:
    server, fast = any_server
    room = f"burst-{deflate}"
    before = writes(server)
    async with asyncio.timeout(60):
        readers = [await member(server, room, deflate) for _ in range(3)]
        sender = await member(server, room, not deflate)
        texts = [f"{n:04d} " + "é" * (n % 7) + "x" * (n * 13 % 600) for n in range(BURST)]
        reading = [asyncio.create_task(chats(r, BURST)) for r in readers]
        for text in texts:  # no waiting between them: one loop turn queues several
            await sender.send(json.dumps({"type": "chat", "room": room, "text": text}))
        results = await asyncio.gather(*reading)
        first = results[0][0][0]
        expected = [(first + n, text) for n, text in enumerate(texts)]
        for got in results:
            assert got == expected
        for ws in (*readers, sender):
            await ws.close()
    after = writes(server)
    if fast:
        assert after["fast"] > before["fast"], (before, after)
        assert "writes: fast where possible" in server.log()
    else:
        assert after["fast"] == 0 and after["asgi"] > before["asgi"], (before, after)
        said = ("writes: ASGI send only (FAST_WRITES=off)", "connections take ASGI send: ")
        assert any(line in server.log() for line in said), server.log()
