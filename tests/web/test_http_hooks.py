"""Hooks over HTTP (CONNECT_HOOK_URL, JOIN_HOOK_URL, CHAT_HOOK_URL) against a real backend:
an async Starlette app on a loopback port (`tests/hookserver.py`), which verifies every
signature. roomcast runs in process (`roomcast.testing`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, TypedDict, Unpack

import pytest
from starlette.datastructures import Secret

from roomcast import Roomcast, Settings, SettingsError, User
from roomcast.client import Forbidden, ServerFailed
from roomcast.protocol.envelopes import Chat
from roomcast.testing import RoomcastTest

from ..brokers import free_port
from ..hookserver import HookServer

SECRET = "hook-secret-" + "q" * 32
API_KEY = "http-hooks-api-key-0123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def backend() -> Iterator[HookServer]:
    server = HookServer(SECRET).start()
    yield server
    server.stop()


@pytest.fixture
def hooks(backend: HookServer) -> HookServer:
    backend.seen.clear()
    return backend


class HookUrls(TypedDict, total=False):
    connect_hook_url: str
    join_hook_url: str
    chat_hook_url: str


def service(backend: HookServer, secret: str = SECRET, **urls: Unpack[HookUrls]) -> Roomcast:
    chosen: HookUrls = urls or {
        "connect_hook_url": backend.url("connect"),
        "join_hook_url": backend.url("join"),
        "chat_hook_url": backend.url("chat"),
    }
    return Roomcast(
        Settings(hook_secret=Secret(secret), hook_timeout=1, api_key=Secret(API_KEY), **chosen)
    )


async def test_signed_requests_carry_the_protocols_bodies(hooks: HookServer) -> None:
    async with RoomcastTest(service(hooks)) as t:
        ann = await t.connect(
            "/ws/lobby", username="ann", headers={"X-Team": "blue"}, cookies={"sid": "abc"}
        )
        assert ann.welcome is not None and ann.welcome.user == User("u-ann", "Ann")
        ack = await ann.send("lobby", "hello")
        chat = await ann.expect(Chat)
        assert (chat.text, chat.offset, chat.user.id) == ("HELLO", ack.offset, "u-ann")
    assert [s.hook for s in hooks.seen] == ["connect", "join", "chat"]
    assert all(s.verified for s in hooks.seen)
    connect = hooks.bodies("connect")[0]
    assert set(connect) == {"headers", "cookies", "query", "client_address"}
    assert connect["headers"]["x-team"] == "blue"
    assert connect["cookies"] == {"sid": "abc"}
    assert connect["query"]["username"] == "ann" and "client" in connect["query"]
    assert connect["client_address"] == "127.0.0.1"
    assert hooks.bodies("join") == [{"user": {"id": "u-ann", "name": "Ann"}, "room": "lobby"}]
    assert hooks.bodies("chat") == [
        {"user": {"id": "u-ann", "name": "Ann"}, "room": "lobby", "text": "hello"}
    ]
    headers = hooks.seen[0].headers
    assert headers["content-type"] == "application/json"
    assert headers["roomcast-signature"].startswith("sha256=")
    assert SECRET not in str(hooks.seen)


async def test_refusals_on_every_route(hooks: HookServer) -> None:
    async with RoomcastTest(service(hooks)) as t:
        with pytest.raises(Forbidden) as refused:
            await t.connect("/ws", username="mallory")
        assert (refused.value.close_code, refused.value.detail) == (4403, "Not you, mallory.")
        ann = await t.connect("/ws", username="ann")
        with pytest.raises(Forbidden, match=r"Ann may not join staff\."):
            await ann.join("staff")
        with pytest.raises(Forbidden):
            await ann.join("staff-2", history=5)
        for path in ("/ws/staff", "/ws/staff?history=5", "/ws/staff?since=e:0"):
            with pytest.raises(Forbidden) as at_connect:
                await t.connect(path, username="bob")
            assert at_connect.value.close_code == 4403, path
        await ann.join("lobby")
        with pytest.raises(Forbidden, match=r"No spam\."):
            await ann.send("lobby", "spam!")
        body: dict[str, Any] = {"type": "chat", "text": "spam", "user": {"id": "o", "name": "O"}}
        api = await t.http.post("/api/rooms/lobby/publish", json=body, headers=AUTH)
        assert (api.status_code, api.json()["error"]) == (403, "forbidden")
        body["text"] = "from the backend"
        api = await t.http.post("/api/rooms/lobby/publish", json=body, headers=AUTH)
        assert api.status_code == 200, api.text
        assert (await ann.expect(Chat)).text == "FROM THE BACKEND"
        history = await t.http.get("/api/rooms/lobby/history", headers=AUTH)
        assert [m["text"] for m in history.json()["messages"]] == ["FROM THE BACKEND"]
    # A chat published through the HTTP API has no socket: the hook is told `user: null`.
    assert hooks.bodies("chat")[-1] == {"user": None, "room": "lobby", "text": "from the backend"}


@pytest.mark.parametrize("room", ["slow-1", "crash-1", "garbage-1", "odd-1"])
async def test_a_hook_that_fails_fails_closed_naming_it(
    hooks: HookServer, room: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "roomcast.hooks")
    async with RoomcastTest(service(hooks)) as t:
        ann = await t.connect("/ws", username="ann")
        with pytest.raises(ServerFailed) as failed:
            await ann.join(room)
        assert failed.value.detail == "The application's join hook failed: retry later."
        await ann.join("lobby")  # the connection stays usable
        assert ann.positions.keys() == {"lobby"}
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "roomcast.hooks")
    assert f"JOIN_HOOK_URL ({hooks.url('join')})" in logged or "HOOK_TIMEOUT" in logged, logged
    why = {
        "slow-1": "1s (HOOK_TIMEOUT)",
        "crash-1": "answered HTTP 500",
        "garbage-1": "answered what is not a join answer",
        "odd-1": "answered what is not a join answer",
    }[room]
    assert why in logged
    assert SECRET not in caplog.text


async def test_connect_hook_failures_refuse_the_connection(
    hooks: HookServer, caplog: pytest.LogCaptureFixture
) -> None:
    rc = service(hooks)
    async with RoomcastTest(rc) as t:
        for name in ("slow", "empty"):
            with pytest.raises(ServerFailed) as failed:
                await t.connect("/ws", username=name)
            assert failed.value.close_code == 1012  # retry later
            assert "connect hook failed" in failed.value.detail
        assert rc.hub.stats().connections == 0
    assert "neither `user` nor `refuse`" in caplog.text


async def test_a_hook_server_that_is_down(caplog: pytest.LogCaptureFixture) -> None:
    down = f"http://127.0.0.1:{free_port()}/hook"
    rc = Roomcast(Settings(hook_secret=Secret(SECRET), hook_timeout=2, join_hook_url=down))
    async with RoomcastTest(rc) as t:
        ann = await t.connect("/ws", username="ann")
        with pytest.raises(ServerFailed, match="join hook failed"):
            await ann.join("lobby")
        with pytest.raises(ServerFailed):
            await t.connect("/ws/lobby")
    assert f"JOIN_HOOK_URL ({down}) could not be reached: ConnectError" in caplog.text
    assert SECRET not in caplog.text


async def test_a_wrong_signature_is_refused_by_the_backend(hooks: HookServer) -> None:
    rc = service(hooks, secret="another-secret-" + "w" * 20, join_hook_url=hooks.url("join"))
    async with RoomcastTest(rc) as t:
        ann = await t.connect("/ws")
        with pytest.raises(ServerFailed):
            await ann.join("lobby")
    assert [s.verified for s in hooks.seen] == [False]


async def test_connections_to_a_hook_are_pooled(hooks: HookServer) -> None:
    async with RoomcastTest(service(hooks, join_hook_url=hooks.url("join"))) as t:
        ann = await t.connect("/ws")
        for room in ("a", "b", "c", "d"):
            await ann.join(room)
    ports = {s.client_port for s in hooks.seen}
    assert len(hooks.seen) == 4 and len(ports) == 1, hooks.seen


@pytest.mark.parametrize(
    ("values", "variable", "why"),
    [
        ({"join_hook_url": "ftp://example.com/x"}, "JOIN_HOOK_URL", "http:// or https://"),
        ({"chat_hook_url": "http:///nohost"}, "CHAT_HOOK_URL", "with a host"),
        ({"connect_hook_url": "http://h:port/x"}, "CONNECT_HOOK_URL", "invalid"),
        ({"connect_hook_url": "http://127.0.0.1/x"}, "HOOK_SECRET", "CONNECT_HOOK_URL is set"),
        ({"hook_secret": Secret("short")}, "HOOK_SECRET", "at least 16"),
    ],
)
def test_bad_hook_settings_name_the_variable(
    values: dict[str, Any], variable: str, why: str
) -> None:
    with pytest.raises(SettingsError) as bad:
        Settings(**values)
    assert variable in str(bad.value) and why in str(bad.value)
