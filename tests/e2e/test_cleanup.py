"""Every disconnect path returns memberships, subscriptions and tasks to zero."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient
from websockets.asyncio.client import ClientConnection, connect

from roomcast import ClientEnvelope, Roomcast, Settings
from roomcast.protocol.codec import Codec

from ..servers import Server, start_server
from ..support import counts
from .test_slow_consumer import stalled_socket

ZERO = {"connections": 0, "rooms": 0, "subscriptions": 0, "tasks": 0, "users": 0}


@pytest.fixture(scope="module")
def own_server() -> Iterator[Server]:
    srv = start_server({"OUTBOX_SIZE": "4", "RATE_LIMIT": "100000"})
    yield srv
    srv.terminate()


async def settle(server: Server, expected: dict[str, int], timeout: float = 15) -> None:
    async with asyncio.timeout(timeout):
        while counts(server) != expected:
            await asyncio.sleep(0.02)  # polling /metrics, bounded by the timeout


async def member(server: Server, room: str) -> ClientConnection:
    ws = await connect(f"{server.ws}/ws/{room}")
    assert json.loads(await ws.recv())["type"] == "welcome"
    assert json.loads(await ws.recv())["type"] == "joined"
    return ws


async def test_close_releases_everything(own_server: Server) -> None:
    async with asyncio.timeout(20):
        clients = [await member(own_server, room) for room in ("a", "a", "b")]
        await clients[0].send(json.dumps({"type": "join", "room": "c"}))
        while json.loads(await clients[0].recv())["type"] != "joined":
            pass
        assert counts(own_server) == {
            "connections": 3,
            "rooms": 3,
            "subscriptions": 3,
            "tasks": 0,  # nothing runs in the background of connections at rest
            "users": 3,
        }
        for ws in clients:
            await ws.close()
        await settle(own_server, ZERO)


async def test_network_drop_releases_everything(own_server: Server) -> None:
    async with asyncio.timeout(20):
        socks = [stalled_socket(own_server, "/ws/drop") for _ in range(3)]
        await settle(
            own_server,
            {**ZERO, "connections": 3, "rooms": 1, "subscriptions": 1, "users": 3},
        )
        for sock in socks:
            # SO_LINGER 0: close sends a TCP reset, no close frame: a dropped network.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        await settle(own_server, ZERO)


async def test_slow_consumer_close_releases_everything(own_server: Server) -> None:
    async with asyncio.timeout(40):
        stalled = stalled_socket(own_server, "/ws/slow")
        try:
            publisher = await member(own_server, "slow")
            # The publisher reads its own acks and chats; the stalled socket never reads.
            big = "z" * 3000
            for _ in range(2000):
                await publisher.send(big)
                if counts(own_server)["connections"] == 1:
                    break
                while json.loads(await publisher.recv())["type"] != "chat":
                    pass
            await settle(
                own_server,
                {**ZERO, "connections": 1, "rooms": 1, "subscriptions": 1, "users": 1},
                timeout=30,
            )
            await publisher.close()
            await settle(own_server, ZERO)
        finally:
            stalled.close()


def test_exception_in_the_endpoint_releases_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    rc = Roomcast(Settings())

    def broken(self: Codec, frame: str) -> ClientEnvelope:
        raise RuntimeError("a bug in the endpoint")

    with TestClient(rc) as client:
        with pytest.raises(RuntimeError, match="a bug"), client.websocket_connect("/ws/a") as ws:
            assert json.loads(ws.receive_text())["type"] == "welcome"
            assert json.loads(ws.receive_text())["type"] == "joined"
            assert rc.hub.stats().rooms == 1
            monkeypatch.setattr(Codec, "decode", broken)
            ws.send_text('{"type":"ping"}')
            ws.receive_text()
        stats = rc.hub.stats()
        assert (stats.connections, stats.rooms, stats.subscriptions, stats.users) == (0, 0, 0, 0)
        assert len(rc.hub.presence) == 0  # type: ignore[arg-type]
