"""The application's hooks in process: on_connect, on_join, on_chat, on_leave, on_disconnect.

Driven with `roomcast.testing` (the typed client over ASGI, no server).
"""

from __future__ import annotations

import asyncio
import logging
import typing
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.datastructures import Secret
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from roomcast import ProtocolError, Refuse, Roomcast, RoomSocket, Settings, User
from roomcast.client import Forbidden, RateLimited, ServerFailed, TooManyRooms, Unauthorized
from roomcast.protocol.envelopes import Chat, System
from roomcast.testing import RoomcastTest

API_KEY = "hooks-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def roomcast(**settings: Any) -> Roomcast:
    return Roomcast(Settings(api_key=Secret(API_KEY), **settings))


async def history_texts(t: RoomcastTest, room: str) -> list[str]:
    answer = await t.http.get(f"/api/rooms/{room}/history", headers=AUTH)
    assert answer.status_code == 200, answer.text
    return [m["text"] for m in answer.json()["messages"]]


async def test_on_connect_reads_the_request_and_sets_the_user() -> None:
    rc = roomcast()
    seen: list[tuple[str | None, str | None, str | None]] = []

    @rc.on_connect
    async def identify(socket: RoomSocket) -> None:
        seen.append(
            (
                socket.headers.get("x-team"),
                socket.cookies.get("theme"),
                socket.query_params.get("username"),
            )
        )
        socket.user = User(
            id="u-" + socket.headers["x-team"], name="Ann of " + socket.headers["x-team"]
        )

    async with RoomcastTest(rc) as t:
        ann = await t.connect(
            "/ws/lobby", username="ann", headers={"X-Team": "blue"}, cookies={"theme": "dark"}
        )
        assert ann.welcome is not None
        assert ann.welcome.user == User("u-blue", "Ann of blue")
        bob = await t.connect("/ws/lobby", username="bob", headers={"X-Team": "red"})
        # Presence and the system event show the identity the hook set.
        joined = await bob.presence("lobby")
        assert {u.id for u in joined.users} == {"u-blue", "u-red"}
        event = await ann.expect(System)
        assert (event.event, event.user) == ("join", User("u-red", "Ann of red"))
        ack = await bob.send("lobby", "hi")
        chat = await ann.expect(Chat)
        assert (chat.user.id, chat.offset) == ("u-red", ack.offset)
    assert seen == [("blue", "dark", "ann"), ("red", None, "bob")]


async def test_on_connect_sees_the_session_of_the_host_app() -> None:
    rc = roomcast()

    @rc.on_connect
    async def from_session(socket: RoomSocket) -> None:
        name = socket.scope.get("session", {}).get("user")
        if name is None:
            raise Refuse(4401, "Log in first.")
        socket.user = User(id=name, name=name.title())

    async def login(request: Request) -> PlainTextResponse:
        request.session["user"] = "ann"
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/login", login, methods=["POST"]), Mount("/rt", app=rc)],
        middleware=[Middleware(SessionMiddleware, secret_key="s" * 32)],
        lifespan=rc.lifespan,
    )
    async with RoomcastTest(app) as t:
        with pytest.raises(Unauthorized) as refused:
            await t.connect("/rt/ws")
        assert (refused.value.close_code, refused.value.detail) == (4401, "Log in first.")
        assert (await t.http.post("/login")).status_code == 200
        ann = await t.connect("/rt/ws", cookies=dict(t.http.cookies))
        assert ann.welcome is not None and ann.welcome.user == User("ann", "Ann")


async def test_refuse_in_on_connect_sends_no_welcome() -> None:
    rc = roomcast()

    @rc.on_connect
    async def gate(socket: RoomSocket) -> None:
        if socket.query_params.get("username") == "mallory":
            raise Refuse(4403, "Not you.")

    async with RoomcastTest(rc) as t:
        with pytest.raises(Forbidden) as refused:
            await t.connect("/ws/lobby", username="mallory")
        assert (refused.value.code, refused.value.close_code) == ("forbidden", 4403)
        stats = rc.hub.stats()
        assert (stats.connections, stats.rooms) == (0, 0)
        await t.connect("/ws/lobby", username="ann")


async def test_on_join_refuses_on_every_route() -> None:
    rc = roomcast()
    asked: list[tuple[str, str]] = []

    @rc.on_join
    async def acl(socket: RoomSocket, room: str) -> None:
        asked.append((socket.user.name, room))
        if room.startswith("staff"):
            raise ProtocolError("forbidden", f"You may not join {room}.")

    async with RoomcastTest(rc) as t:
        ann = await t.connect("/ws", username="ann")
        with pytest.raises(Forbidden) as plain:
            await ann.join("staff")
        assert (plain.value.detail, plain.value.room) == ("You may not join staff.", "staff")
        with pytest.raises(Forbidden):
            await ann.join("staff-2", history=10)
        await ann.join("lobby", history=10)
        for path in ("/ws/staff", "/ws/staff?history=5", "/ws/staff?since=abc:0"):
            with pytest.raises(Forbidden) as at_connect:
                await t.connect(path, username="bob")
            assert at_connect.value.close_code == 4403, path
        assert (await ann.ping()).ref is not None  # still usable
        assert ann.positions.keys() == {"lobby"}
    assert asked == [
        ("ann", "staff"),
        ("ann", "staff-2"),
        ("ann", "lobby"),
        *[("bob", "staff")] * 3,
    ]


async def test_on_chat_returns_the_text_to_store_in_registration_order() -> None:
    rc = roomcast()

    @rc.on_chat
    async def censor(socket: RoomSocket | None, room: str, text: str) -> str:
        return text.replace("darn", "d**n")

    @rc.on_chat
    async def sign(socket: RoomSocket | None, room: str, text: str) -> str:
        who = socket.user.name if socket is not None else "api"
        if "spam" in text:
            raise ProtocolError("forbidden", "No spam here.")
        return f"{text} ({who})"

    async with RoomcastTest(rc) as t:
        ann = await t.connect("/ws/lobby", username="ann")
        bob = await t.connect("/ws/lobby", username="bob")
        ack = await ann.send("lobby", "darn it")
        chat = await bob.expect(Chat)
        assert (chat.text, chat.offset) == ("d**n it (ann)", ack.offset)
        with pytest.raises(Forbidden) as refused:
            await ann.send("lobby", "buy spam")
        assert refused.value.detail == "No spam here."
        # Over the HTTP API the hooks run with socket None; a refusal stores nothing.
        body = {"type": "chat", "text": "darn", "user": {"id": "ops", "name": "Ops"}}
        published = await t.http.post("/api/rooms/lobby/publish", json=body, headers=AUTH)
        assert published.status_code == 200, published.text
        body["text"] = "spam"
        refused_api = await t.http.post("/api/rooms/lobby/publish", json=body, headers=AUTH)
        assert refused_api.status_code == 403
        assert refused_api.json() == {"error": "forbidden", "detail": "No spam here."}
        assert await history_texts(t, "lobby") == ["d**n it (ann)", "d**n (api)"]


async def test_on_chat_output_is_checked_like_the_input() -> None:
    rc = roomcast(max_text_chars=10)

    @rc.on_chat
    async def rewrite(socket: RoomSocket | None, room: str, text: str) -> str:
        return {"blank": "   ", "long": "x" * 11}.get(text, text)

    async with RoomcastTest(rc) as t:
        ann = await t.connect("/ws/lobby")
        with pytest.raises(Exception, match="empty once the application") as blank:
            await ann.send("lobby", "blank")
        assert blank.value.code == "invalid_message"  # type: ignore[attr-defined]
        with pytest.raises(Exception, match="11 characters once") as long:
            await ann.send("lobby", "long")
        assert long.value.code == "text_too_long"  # type: ignore[attr-defined]
        await ann.send("lobby", "fine")
        assert await history_texts(t, "lobby") == ["fine"]


async def test_a_failing_hook_answers_internal_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rc = roomcast()

    @rc.on_join
    async def broken(socket: RoomSocket, room: str) -> None:
        if room == "bad":
            raise KeyError("the ACL service is down")

    @rc.on_chat
    async def wrong_type(socket: RoomSocket | None, room: str, text: str) -> str:
        return None if text == "none" else text  # type: ignore[return-value]

    caplog.set_level(logging.INFO, "roomcast.hooks")
    async with RoomcastTest(rc) as t:
        ann = await t.connect("/ws", username="ann")
        with pytest.raises(ServerFailed) as failed:
            await ann.join("bad")
        assert failed.value.detail == "The application's join hook failed: retry later."
        await ann.join("good")  # the connection stays usable
        with pytest.raises(ServerFailed):
            await ann.send("good", "none")
        await ann.send("good", "some")
        with pytest.raises(ServerFailed) as at_connect:
            await t.connect("/ws/bad")
        assert at_connect.value.close_code == 1012  # refused: retry later
    logged = [r for r in caplog.records if r.name == "roomcast.hooks"]
    traced = [r for r in logged if r.exc_info and "broken" in r.getMessage()]
    assert len(traced) == 2 and "ACL service is down" in caplog.text
    assert any("wrong_type" in r.getMessage() and "returned None" in r.getMessage() for r in logged)


async def test_a_slow_hook_times_out_and_blocks_no_fan_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rc = roomcast(hook_timeout=1)
    gate = asyncio.Event()

    @rc.on_join
    async def slow(socket: RoomSocket, room: str) -> None:
        if room.startswith("slow"):
            await gate.wait()

    async with RoomcastTest(rc) as t:
        ann = await t.connect("/ws/lobby", username="ann")
        bob = await t.connect("/ws/lobby", username="bob")
        joining = asyncio.create_task(bob.join("slow-a"))
        await asyncio.sleep(0)  # let the join request leave (no timing: the gate holds it)
        # While bob's join hook waits, lobby's messages still reach him.
        for text in ("one", "two"):
            ack = await ann.send("lobby", text)
            chat = await bob.expect(Chat, timeout=2.0)
            assert (chat.text, chat.offset) == (text, ack.offset)
        with pytest.raises(ServerFailed):
            await asyncio.wait_for(joining, 10)
        assert "took over 1s (HOOK_TIMEOUT)" in caplog.text
        gate.set()
        await bob.join("slow-b")  # usable, and the hook let it in this time
        assert bob.positions.keys() == {"lobby", "slow-b"}


async def test_sockets_in_their_connect_hooks_count_towards_max_connections() -> None:
    rc = roomcast(max_connections=1)
    gate = asyncio.Event()
    entered = asyncio.Event()

    @rc.on_connect
    async def wait(socket: RoomSocket) -> None:
        if socket.query_params.get("username") == "first":
            entered.set()
            await gate.wait()

    async with RoomcastTest(rc) as t:
        first = asyncio.create_task(t.connect("/ws", username="first"))
        await asyncio.wait_for(entered.wait(), 5)
        with pytest.raises(RateLimited) as refused:
            await t.connect("/ws", username="second")
        assert refused.value.close_code == 4429
        gate.set()
        assert (await asyncio.wait_for(first, 5)).welcome is not None


async def test_hooks_run_after_the_protocols_checks() -> None:
    rc = roomcast(max_rooms=1)
    asked: list[str] = []

    @rc.on_join
    async def count(socket: RoomSocket, room: str) -> None:
        asked.append(room)

    async with RoomcastTest(rc) as t:
        ann = await t.connect("/ws")
        await ann.join("a")
        await ann.join("a")  # already a member: nothing to approve
        with pytest.raises(TooManyRooms):
            await ann.join("b")
    assert asked == ["a"]


async def test_on_leave_and_on_disconnect() -> None:
    rc = roomcast()
    events: list[tuple[str, ...]] = []

    @rc.on_leave
    async def left(socket: RoomSocket, room: str) -> None:
        events.append(("leave", socket.user.name, room))

    @rc.on_disconnect
    async def gone(socket: RoomSocket) -> None:
        events.append(("disconnect", socket.user.name, *sorted(socket.rooms)))

    @rc.on_leave
    async def broken(socket: RoomSocket, room: str) -> None:
        raise RuntimeError("only logged")

    async with RoomcastTest(rc) as t:
        ann = await t.connect("/ws/a", username="ann")
        await ann.join("b")
        await ann.join("c")
        await ann.leave("b")
        await ann.leave("never-joined")
        await ann.close()
        refused_user = await t.connect("/ws", username="bob")  # admitted, in no room
        await refused_user.close()
    assert events == [
        ("leave", "ann", "b"),
        ("leave", "ann", "a"),
        ("leave", "ann", "c"),
        ("disconnect", "ann"),
        ("disconnect", "bob"),
    ]


async def test_the_user_is_set_only_in_on_connect() -> None:
    rc = roomcast()

    @rc.on_join
    async def rename(socket: RoomSocket, room: str) -> None:
        socket.user = User("x", "x")

    @rc.on_connect
    async def bad_id(socket: RoomSocket) -> None:
        if socket.query_params.get("username") == "blank":
            socket.user = User("  ", "blank")

    async with RoomcastTest(rc) as t:
        ann = await t.connect("/ws")
        with pytest.raises(ServerFailed):
            await ann.join("lobby")
        with pytest.raises(ServerFailed):
            await t.connect("/ws", username="blank")


def test_hooks_are_registered_before_serving_and_keep_their_type() -> None:
    rc = roomcast()
    for name in ("on_connect", "on_join", "on_chat", "on_leave", "on_disconnect"):
        hints = typing.get_type_hints(getattr(Roomcast, name))
        assert isinstance(hints["return"], typing.TypeVar), name
        assert hints["return"] is hints["hook"], name
    rc.app  # noqa: B018 - built: the app serves

    async def acl(socket: RoomSocket, room: str) -> None:
        pass

    with pytest.raises(RuntimeError, match="before the app serves"):
        rc.on_join(acl)
