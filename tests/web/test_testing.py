"""`roomcast.testing`: the app in process, driven by the typed client over ASGI."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.datastructures import Secret
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from roomcast import Roomcast, Settings
from roomcast.client import (
    ConnectionFailed,
    Forbidden,
    InvalidRoom,
    NotJoined,
    Reconnected,
    Unauthorized,
)
from roomcast.protocol.envelopes import Chat, Joined, Notification, System
from roomcast.testing import AppFailed, RoomcastTest
from roomcast.web.auth import mint_token

SECRET = "testing-secret-" + "z" * 40


def live_tasks() -> set[asyncio.Task[Any]]:
    current = asyncio.current_task()
    return {t for t in asyncio.all_tasks() if t is not current and not t.done()}


async def test_the_issues_example() -> None:
    rc = Roomcast(Settings())

    @rc.on_chat
    async def moderate(socket: Any, room: str, text: str) -> str:
        return text.replace("darn", "d**n")

    async with RoomcastTest(rc) as t:
        ann = await t.connect("/ws", username="ann")
        bob = await t.connect("/ws/lobby", username="bob")
        await ann.join("lobby")
        ack = await ann.send("lobby", "darn")
        chat = await bob.expect(Chat, timeout=1.0)
        assert chat.text == "d**n" and chat.offset == ack.offset
        assert chat.user.name == "ann"


async def test_iteration_yields_typed_envelopes_in_order() -> None:
    async with RoomcastTest(Roomcast(Settings())) as t:
        ann = await t.connect("/ws", username="ann")
        bob = await t.connect("/ws/news", username="bob")
        await ann.join("news")
        for text in ("a", "b", "c"):
            await ann.send("news", text)
        seen: list[Any] = []
        async for envelope in bob:
            seen.append(envelope)
            if isinstance(envelope, Chat) and envelope.text == "c":
                break
        kinds = [type(e).__name__ for e in seen]
        assert kinds == ["Joined", "System", "Chat", "Chat", "Chat"], seen
        assert [e.offset for e in seen if isinstance(e, Chat)] == [1, 2, 3]
        # A late joiner asks for history: replayed before `joined` returns.
        cat = await t.connect("/ws", username="cat")
        joined = await cat.join("news", history=2)
        assert isinstance(joined, Joined) and joined.offset == 3
        replayed = [await cat.expect(Chat), await cat.expect(Chat)]
        assert [c.text for c in replayed] == ["b", "c"]
        presence = await bob.presence("news")
        assert presence.online == 3
        await cat.leave("news")
        with pytest.raises(NotJoined):
            await cat.send("news", "gone")


async def test_expect_says_what_came_instead() -> None:
    async with RoomcastTest(Roomcast(Settings())) as t:
        ann = await t.connect("/ws/lobby", username="ann")
        await t.connect("/ws/lobby", username="bob")
        with pytest.raises(AssertionError) as failed:
            await ann.expect(Notification, timeout=0.5)
        message = str(failed.value)
        assert message.startswith("no Notification within 0.5s; came instead: Joined(")
        assert re.search(r"System\(room='lobby', event='join', user=User\(.*name='bob'", message)
        with pytest.raises(AssertionError, match="came instead: nothing"):
            await ann.expect(Chat, timeout=0.1)


async def test_refused_connects_raise_the_clients_errors() -> None:
    rc = Roomcast(Settings(jwt_secret=Secret(SECRET)))
    async with RoomcastTest(rc) as t:
        with pytest.raises(Unauthorized) as no_token:
            await t.connect("/ws")
        assert no_token.value.close_code == 4401
        token = mint_token(SECRET, "ann", name="Ann", rooms=["lobby"])
        with pytest.raises(Forbidden) as not_permitted:
            await t.connect("/ws/secret", token=token)
        assert not_permitted.value.close_code == 4403
        with pytest.raises(InvalidRoom) as bad_room:
            await t.connect("/ws/bad%20room", token=token)
        assert bad_room.value.close_code == 1008
        with pytest.raises(ConnectionFailed, match="refused the WebSocket handshake"):
            await t.connect("/nowhere", token=token)
        ann = await t.connect("/ws/lobby", token=token)
        assert ann.welcome is not None and ann.welcome.user.name == "Ann"


async def test_a_mounted_app_and_its_http_routes() -> None:
    rc = Roomcast(Settings(api_key=Secret("testing-api-key-0123")))
    app = Starlette(routes=[Mount("/rt", app=rc)], lifespan=rc.lifespan)
    async with RoomcastTest(app) as t:
        ann = await t.connect("/rt/ws/lobby", username="ann")
        answer = await t.http.post(
            "/rt/api/rooms/lobby/publish",
            json={"type": "notification", "title": "Deploy", "body": "v2"},
            headers={"Authorization": "Bearer testing-api-key-0123"},
        )
        assert answer.status_code == 200, answer.text
        note = await ann.expect(Notification)
        assert (note.title, note.offset) == ("Deploy", answer.json()["offset"])
        assert await rc.notify_user(ann.welcome.user.id, title="Hi", body="you") == 1  # type: ignore[union-attr]
        assert (await ann.expect(Notification)).title == "Hi"


async def test_the_client_reconnects_in_process_and_recovers() -> None:
    rc = Roomcast(Settings())
    async with RoomcastTest(rc) as t:
        ann = await t.connect("/ws", username="ann")
        ann.backoff = (0.01, 0.05)
        await ann.join("lobby")
        await ann.send("lobby", "before")
        assert (await ann.expect(Chat)).text == "before"
        assert ann.welcome is not None
        await rc.disconnect_user(ann.welcome.user.id, code=1012)
        event = await ann.expect(Reconnected, timeout=5)
        assert event.attempts >= 1
        ack = await ann.send("lobby", "after")
        chat = await ann.expect(Chat)
        assert (chat.text, chat.offset) == ("after", ack.offset)


async def test_a_reconnect_refused_by_a_failing_connect_hook_is_retried() -> None:
    rc = Roomcast(Settings())
    attempts: list[int] = []

    @rc.on_connect
    async def flaky(socket: Any) -> None:
        attempts.append(len(attempts))
        if len(attempts) == 2:  # the first reconnect: the user service is down
            raise ConnectionError("the user service is down")

    async with RoomcastTest(rc) as t:
        ann = await t.connect("/ws/lobby", username="ann")
        ann.backoff = (0.01, 0.05)
        assert ann.welcome is not None
        await rc.disconnect_user(ann.welcome.user.id, code=1012)
        event = await ann.expect(Reconnected, timeout=5)
        assert event.attempts == 2 and len(attempts) == 3


class Boom:
    """Host middleware that fails on one path (an app bug a test must see)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("path", "").endswith("/boom"):
            raise LookupError("the host app failed")
        await self.app(scope, receive, send)


async def test_an_app_failure_is_raised_not_hidden() -> None:
    rc = Roomcast(Settings())
    app = Boom(rc)
    with pytest.raises(AppFailed, match="LookupError") as failed:
        async with RoomcastTest(app) as t:
            with pytest.raises(ConnectionFailed):
                await t.connect("/ws/boom")
    assert isinstance(failed.value.__cause__, LookupError)


async def test_it_leaves_no_task_behind() -> None:
    before = live_tasks()
    rc = Roomcast(Settings())

    @rc.on_join
    async def slow(socket: Any, room: str) -> None:
        await asyncio.sleep(0)

    async with RoomcastTest(rc) as t:
        clients = [await t.connect(f"/ws/room-{i % 3}", username=f"u{i}") for i in range(9)]
        for index, client in enumerate(clients):
            await client.send(f"room-{index % 3}", "hi")
        await clients[0].expect(System)
        await clients[1].close()  # the others are closed by RoomcastTest
        assert rc.hub.stats().connections == 8
        during = live_tasks() - before
        assert during, "the clients and the lifespan run in tasks while the test runs"
    assert live_tasks() - before == set()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_it_runs_under_anyio() -> None:
    async with RoomcastTest(Roomcast(Settings())) as t:
        ann = await t.connect("/ws/lobby", username="ann")
        await ann.send("lobby", "hello")
        assert (await ann.expect(Chat)).text == "hello"


@pytest.fixture(params=range(100))
def case(request: pytest.FixtureRequest) -> Iterator[int]:
    yield request.param


async def test_a_hundred_apps(case: int) -> None:
    """A hundred small tests, each with its own app: `time pytest -k hundred` is the
    figure the README quotes (no timing is asserted here)."""
    async with RoomcastTest(Roomcast(Settings())) as t:
        ann = await t.connect("/ws/lobby", username="ann")
        bob = await t.connect("/ws/lobby", username="bob")
        ack = await ann.send("lobby", f"message {case}")
        chat = await bob.expect(Chat)
        assert (chat.text, chat.offset) == (f"message {case}", ack.offset)
