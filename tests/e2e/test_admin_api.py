"""`GET /api/stats` and `GET /api/rooms` against real servers: exact figures after known
traffic on one worker, on two servers sharing a broker, and on two workers of one
server; rates while a publisher runs and after; a broker outage; a mounted app."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from ..brokers import start_redis
from ..servers import Server, start_app, start_server
from ..support import Client, client, http, room_client
from .test_api import AUTH, KEY, api
from .test_scaleout import shared_env, two_servers

WITHIN = 30.0  # seconds a figure may take to settle on a loaded machine


async def stats(server: Server, query: str = "") -> dict[str, Any]:
    answer: dict[str, Any] = await api(server, "GET", "/api/stats" + query)
    return answer


async def room_list(server: Server, query: str = "") -> list[dict[str, Any]]:
    answer = await api(server, "GET", "/api/rooms" + query)
    assert set(answer) == {"rooms"}, answer
    rooms: list[dict[str, Any]] = answer["rooms"]
    return rooms


async def settle(
    server: Server, done: Callable[[dict[str, Any]], bool], query: str = ""
) -> dict[str, Any]:
    """Poll /api/stats until `done` holds (bounded by WITHIN): rates change by the second."""
    deadline = time.monotonic() + WITHIN
    while True:
        found = await stats(server, query)
        if done(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"/api/stats never settled: last {found}")
        await asyncio.sleep(0.2)  # polling interval, bounded by the deadline


@dataclass
class Traffic:
    tag: str
    lobby: str
    team: str
    epoch: str


@contextlib.asynccontextmanager
async def known_traffic(here: Server, there: Server) -> AsyncIterator[Traffic]:
    """Four connections of three users in two rooms, on `here` and `there`:

    alice twice (one connection on each server) in the lobby, the first also in
    the team; bob in the lobby; carol connected to no room. alice chats twice in
    the lobby.
    """
    tag = "a" + uuid.uuid4().hex[:10]
    lobby, team = f"{tag}-lobby", f"{tag}-team"
    alice_id, bob_id, carol_id = (f"{tag}-{name}" for name in ("alice", "bob", "carol"))
    async with contextlib.AsyncExitStack() as stack:
        alice = await stack.enter_async_context(room_client(here, lobby, client=alice_id))
        await alice.join(team)
        await stack.enter_async_context(room_client(there, lobby, client=alice_id))
        bob = await stack.enter_async_context(room_client(there, lobby, client=bob_id))
        await stack.enter_async_context(client(here, client=carol_id))
        for text in ("one", "two"):
            await alice.send({"type": "chat", "room": lobby, "text": text})
            await until_chat(alice, text)
        await until_chat(bob, "two")
        yield Traffic(tag, lobby, team, alice.joined["epoch"])


async def until_chat(conn: Client, text: str) -> None:
    async with asyncio.timeout(10):
        while True:
            frame = await conn.recv(10)
            if frame["type"] == "chat" and frame["text"] == text:
                return


async def check_known_traffic(servers: tuple[Server, ...], traffic: Traffic, workers: int) -> None:
    """Every server answers for the whole cluster."""
    for server in servers:
        found = await stats(server)
        assert found == {
            "workers": workers,
            "connections": 4,
            "rooms": 2,
            "users": 3,
            "messages_in_per_s": found["messages_in_per_s"],
            "deliveries_per_s": found["deliveries_per_s"],
            "slow_consumers_total": 0,
            "broker": "connected",
            "history": "connected",
        }
        rooms = await room_list(server, f"?prefix={traffic.tag}")
        assert rooms == [
            {"room": traffic.lobby, "online": 2, "epoch": traffic.epoch, "offset": 2},
            {"room": traffic.team, "online": 1, "epoch": rooms[1]["epoch"], "offset": 0},
        ]
        assert await room_list(server, f"?prefix={traffic.tag}-t") == rooms[1:]
        assert await room_list(server, "?limit=1") == rooms[:1]


async def check_all_gone(server: Server) -> None:
    await settle(server, lambda s: (s["connections"], s["rooms"], s["users"]) == (0, 0, 0))
    assert await room_list(server) == []


# --- one worker ------------------------------------------------------------------


@pytest.fixture
def one() -> Iterator[Server]:
    srv = start_server({"API_KEY": KEY, "RATE_LIMIT": "5000"})
    yield srv
    srv.terminate()


async def test_stats_and_rooms_count_known_traffic_on_one_worker(one: Server) -> None:
    async with known_traffic(one, one) as traffic:
        await check_known_traffic((one,), traffic, workers=1)
        # The chart's series: 300 seconds, the last one whole after the traffic.
        found = await settle(one, lambda s: s["series"]["connections"][-1] == 4, "?series=1")
        series = found["series"]
        assert len(series["connections"]) == len(series["deliveries"]) == 300
        assert abs(series["end"] - time.time()) < 60
        # Each chat reached the lobby's three connections.
        assert sum(series["deliveries"]) >= 6
    await check_all_gone(one)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("/api/rooms?prefix=a%20b", "prefix"),
        ("/api/rooms?prefix=" + "x" * 65, "prefix"),
        ("/api/rooms?limit=0", "limit"),
        ("/api/rooms?limit=many", "limit"),
        ("/api/stats?series=2", "series"),
        ("/api/stats?series=yes", "series"),
    ],
)
def test_a_bad_query_is_400_naming_the_parameter(one: Server, query: str, field: str) -> None:
    status, answer = http(one, "GET", query, None, AUTH)
    assert (status, answer["error"]) == (400, "invalid_query"), answer
    assert f"`{field}`" in answer["detail"]


# --- several workers ---------------------------------------------------------------


@pytest.fixture(params=["redis", "postgres", "kafka"])
def admin_pair(request: pytest.FixtureRequest) -> Iterator[tuple[Server, Server]]:
    with two_servers({**shared_env(request, request.param), "API_KEY": KEY}) as servers:
        yield servers


@pytest.mark.slow
async def test_stats_and_rooms_cover_two_servers_sharing_a_broker(
    admin_pair: tuple[Server, Server],
) -> None:
    first, second = admin_pair
    async with known_traffic(first, second) as traffic:
        await check_known_traffic(admin_pair, traffic, workers=2)
        # 128 rooms of 64-character names on one server: its answers are over
        # Postgres' 8000-byte NOTIFY limit, so they travel in parts.
        names = [f"{traffic.tag}-{i:03d}-".ljust(64, "x") for i in range(128)]
        async with client(second) as dave, client(second) as erin:
            for conn, mine in ((dave, names[:64]), (erin, names[64:])):
                for name in mine:
                    await conn.join(name)
            for server in admin_pair:
                found = await stats(server)
                assert (found["rooms"], found["users"], found["connections"]) == (130, 5, 6)
                rooms = await room_list(server, f"?prefix={traffic.tag}&limit=1000")
                assert [r["room"] for r in rooms] == [traffic.lobby, *sorted(names), traffic.team]
    for server in admin_pair:
        await check_all_gone(server)


@pytest.mark.slow
async def test_rates_rise_while_a_publisher_runs_and_fall_back_to_zero(
    request: pytest.FixtureRequest,
) -> None:
    env = {**shared_env(request, "redis"), "API_KEY": KEY}
    with two_servers(env) as (first, second):
        room = "r" + uuid.uuid4().hex[:10]
        async with (
            room_client(second, room) as member,
            room_client(second, room) as other,
            room_client(first, room) as sender,
        ):
            stop = asyncio.Event()

            async def publisher() -> None:
                while not stop.is_set():
                    await sender.send({"type": "chat", "room": room, "text": "tick"})
                    await asyncio.sleep(0.05)  # a steady 20 chats per second

            async def reader(conn: Client) -> None:  # members that keep up
                while True:
                    await conn.recv(120)

            running = asyncio.gather(publisher(), reader(member), reader(other), reader(sender))
            try:
                # Asked on the server with no member: the deliveries are the other's.
                busy = await settle(
                    first, lambda s: s["deliveries_per_s"] > 0 and s["messages_in_per_s"] > 0
                )
                assert busy["workers"] == 2
            finally:
                stop.set()
            idle = await settle(
                first, lambda s: (s["deliveries_per_s"], s["messages_in_per_s"]) == (0, 0)
            )
            assert idle["connections"] == 3
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running


@pytest.mark.slow
async def test_two_workers_of_one_server_answer_as_one(redis_url: str) -> None:
    env = {
        "BROADCAST_URL": f"{redis_url}?prefix=w{uuid.uuid4().hex[:12]}",
        "WEB_CONCURRENCY": "2",
        "API_KEY": KEY,
        "RATE_LIMIT": "5000",
    }
    server = start_server(env)
    try:
        # start_server returns once one worker serves; the other may still be starting.
        await settle(server, lambda s: s["workers"] == 2)
        # Connections land on either worker; the figures are the cluster's all the same.
        async with known_traffic(server, server) as traffic:
            await check_known_traffic((server,), traffic, workers=2)
        await check_all_gone(server)
        assert server.log().count("Started server process") == 2, server.log()
    finally:
        server.terminate()


@pytest.mark.slow
async def test_a_broker_outage_is_shown_as_reconnecting() -> None:
    redis = start_redis()
    server = start_server({"BROADCAST_URL": redis.url, "API_KEY": KEY})
    try:
        async with room_client(server, "lobby"):
            found = await stats(server)
            assert (found["broker"], found["history"], found["connections"]) == (
                "connected",
                "connected",
                1,
            )
            redis.stop(keep_data=True)
            # Still an answer: this worker's own figures, and the state in words.
            down = await settle(server, lambda s: s["broker"] == "reconnecting")
            assert (down["history"], down["connections"], down["workers"]) == ("unavailable", 1, 1)
            # The rooms' offsets are in Redis too: the room list cannot be read.
            status, answer = http(server, "GET", "/api/rooms", None, AUTH)
            assert (status, answer["error"]) == (503, "unavailable"), answer
            redis = start_redis(restart=redis)
            back = ("connected", "connected")
            await settle(server, lambda s: (s["broker"], s["history"]) == back)
    finally:
        server.terminate()
        redis.stop()


# --- mounted in an app ---------------------------------------------------------------


def test_routes_and_page_work_under_a_prefix() -> None:
    server = start_app("tests.hostapp:app", "/rt", {"API_KEY": KEY})
    try:
        status, found = http(server, "GET", "/api/stats", None, AUTH)
        assert status == 200 and found["workers"] == 1, found
        with urllib.request.urlopen(server.http + "/admin", timeout=5) as response:
            page = response.read().decode()
            csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        # Relative asset URLs resolve below the mount point.
        for asset in ("admin.js", "admin.css"):
            assert f'"static/{asset}?v=' in page
            with urllib.request.urlopen(f"{server.http}/static/{asset}", timeout=5) as response:
                assert response.status == 200
    finally:
        server.terminate()
