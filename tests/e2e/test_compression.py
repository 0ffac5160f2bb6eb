"""permessage-deflate as WS_COMPRESSION sets it: refused, shared, or per connection; what a
client sends is still inflated per connection under MAX_MESSAGE_BYTES."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from ..servers import Server, start_server


@pytest.fixture(scope="module", params=["off", "shared", "per-connection"])
def mode(request: pytest.FixtureRequest) -> Iterator[tuple[str, Server]]:
    server = start_server({"WS_COMPRESSION": request.param, "RATE_LIMIT": "1000"})
    yield request.param, server
    server.terminate()


async def test_the_handshake_negotiates_what_the_setting_says(mode: tuple[str, Server]) -> None:
    name, server = mode
    async with connect(f"{server.ws}/ws", compression="deflate") as ws:
        assert json.loads(await ws.recv())["type"] == "welcome"
        offered = ws.response.headers.get("Sec-WebSocket-Extensions") if ws.response else None
    if name == "off":
        assert offered is None
    else:
        assert offered is not None and offered.startswith("permessage-deflate")
        no_takeover = "server_no_context_takeover" in offered
        assert no_takeover == (name == "shared"), offered
        assert ("client_no_context_takeover" in offered) == (name == "shared"), offered


async def test_a_decompression_bomb_is_closed_1009_before_it_inflates(
    mode: tuple[str, Server],
) -> None:
    """10 MB of zeros deflate to about 10 kB: the server stops inflating at
    MAX_MESSAGE_BYTES (64 KiB) and closes with 1009; the others go on."""
    _, server = mode
    async with (
        connect(f"{server.ws}/ws/bomb", compression="deflate", max_size=None) as bomber,
        connect(f"{server.ws}/ws/bomb") as other,
    ):
        for ws in (bomber, other):
            assert json.loads(await ws.recv())["type"] == "welcome"
            assert json.loads(await ws.recv())["type"] == "joined"
        bomb = '{"type":"chat","room":"bomb","text":"' + "0" * 10_000_000 + '"}'
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(10):
                await bomber.send(bomb)  # uncompressed (WS_COMPRESSION=off), it may not finish
                while True:
                    await bomber.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        await other.send(json.dumps({"type": "ping", "ref": "still"}))
        async with asyncio.timeout(10):
            while (frame := json.loads(await other.recv()))["type"] != "pong":
                pass
        assert frame["ref"] == "still"
