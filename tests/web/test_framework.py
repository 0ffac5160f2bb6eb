"""roomcast as a framework: mounted in a user's Starlette app, with a custom envelope."""

from __future__ import annotations

import ast
import json
import typing
from pathlib import Path
from typing import Any

import msgspec
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

import roomcast.protocol.codec
from roomcast import ClientEnvelope, ProtocolError, Roomcast, RoomSocket, ServerEnvelope, Settings
from roomcast.app import _route_path, _socket_params
from roomcast.testing import RoomcastTest

SOURCE = Path(__file__).resolve().parent.parent.parent / "service"


class Typing(ClientEnvelope, tag="typing", kw_only=True):
    room: str


class TypingNotice(ServerEnvelope, tag="typing_notice", kw_only=True):
    room: str
    user: str


def build_app() -> tuple[Starlette, Roomcast]:
    rc = Roomcast(Settings())
    rc.server_envelope(TypingNotice)

    @rc.handler(Typing)
    async def typing(socket: RoomSocket, message: Typing) -> None:
        assert socket.conn is not None
        if message.room not in socket.conn.rooms:
            raise ProtocolError("not_joined", f"Join room {message.room!r} first.")
        await socket.hub.publisher.broadcast(
            message.room, TypingNotice(room=message.room, user=socket.conn.user.name)
        )

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("my app")

    app = Starlette(routes=[Route("/", home), Mount("/rt", app=rc)], lifespan=rc.lifespan)
    return app, rc


def frames_until(ws: Any, kind: str) -> dict[str, Any]:
    for _ in range(50):
        frame = json.loads(ws.receive_text())
        if frame["type"] == kind:
            return frame  # type: ignore[no-any-return]
    raise AssertionError(f"no {kind} frame")


def test_custom_envelope_in_a_mounted_app(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[object] = []
    original = roomcast.protocol.codec.Codec.__init__

    def counting(self: roomcast.protocol.codec.Codec, *args: Any, **kwargs: Any) -> None:
        built.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(roomcast.protocol.codec.Codec, "__init__", counting)
    app, _ = build_app()
    with TestClient(app) as client:
        assert client.get("/").text == "my app"
        assert client.get("/rt/healthz").json()["status"] == "ok"
        with (
            client.websocket_connect("/rt/ws/lobby?username=ann") as ann,
            client.websocket_connect("/rt/ws/lobby?username=bob") as bob,
        ):
            frames_until(ann, "joined")
            frames_until(bob, "joined")
            for _ in range(3):
                bob.send_text(json.dumps({"type": "typing", "room": "lobby"}))
                notice = frames_until(ann, "typing_notice")
                assert notice == {"type": "typing_notice", "room": "lobby", "user": "bob"}
            # The custom type is validated like the protocol's own.
            bob.send_text(json.dumps({"type": "typing", "ref": "t1"}))
            error = frames_until(bob, "error")
            assert error["code"] == "invalid_message" and "room" in error["detail"]
            assert error["ref"] == "t1"
            bob.send_text(json.dumps({"type": "typing", "room": "elsewhere", "ref": "t2"}))
            error = frames_until(bob, "error")
            assert (error["code"], error["ref"]) == ("not_joined", "t2")
        schema = client.get("/rt/schema.json").json()
    # The decoder was built once for the app, not per frame.
    assert len(built) == 1
    assert "Typing" in schema["$defs"] and "TypingNotice" in schema["$defs"]
    client_tags = json.dumps(schema["$defs"]["ClientMessage"])
    assert "Typing" in client_tags
    assert msgspec.json.decode(b'{"type":"typing","room":"a"}', type=Typing).room == "a"


def test_registering_after_serving_is_a_wiring_error() -> None:
    app, rc = build_app()
    with TestClient(app):
        rc.app  # noqa: B018 - built by the first request at the latest
        with pytest.raises(RuntimeError, match="before the app serves"):
            rc.handler(Typing)
        with pytest.raises(RuntimeError, match="before the app serves"):
            rc.server_envelope(TypingNotice)


def test_registering_something_else_is_a_type_error() -> None:
    rc = Roomcast(Settings())
    with pytest.raises(TypeError, match="ClientEnvelope"):
        rc.handler(TypingNotice)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ServerEnvelope"):
        rc.server_envelope(Typing)  # type: ignore[type-var]


def test_the_package_guards_nothing_with_assert() -> None:
    """`python -O` strips asserts: no check of roomcast's may rely on one."""
    found = [
        f"{path.relative_to(SOURCE)}:{node.lineno}"
        for path in sorted(SOURCE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assert)
    ]
    assert not found, found


def test_the_package_times_out_with_asyncio_timeout_not_wait_for() -> None:
    """On Python 3.11 `asyncio.wait_for` can swallow a cancellation that arrives as its
    awaitable finishes; a background loop then never stops (a Kafka watchdog did, and
    `disconnect()` hung). `asyncio.timeout` has no such window."""
    found = [
        f"{path.relative_to(SOURCE)}:{node.lineno}"
        for path in sorted(SOURCE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "wait_for"
    ]
    assert not found, found


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/ws", {}),
        ("/ws/lobby", {"room": "lobby"}),
        ("/ws/a.b:c-1", {"room": "a.b:c-1"}),
        ("/ws/bad room", {"room": "bad room"}),  # the endpoint refuses it with 1008
        ("/ws/", None),
        ("/ws/a/b", None),
        ("/wss", None),
        ("/", None),
    ],
)
def test_socket_paths(path: str, params: dict[str, str] | None) -> None:
    assert _socket_params(path) == params


@pytest.mark.parametrize(
    ("path", "root", "route"),
    [
        ("/rt/ws", "/rt", "/ws"),
        ("/ws", "", "/ws"),
        ("/rtx/ws", "/rt", "/rtx/ws"),
        ("/rt", "/rt", ""),
    ],
)
def test_route_path_below_the_mount(path: str, root: str, route: str) -> None:
    assert _route_path({"type": "websocket", "path": path, "root_path": root}) == route


def test_other_websocket_paths_are_still_refused() -> None:
    """/ws and /ws/{room} go straight to the endpoint; anything else meets the router."""
    app, _ = build_app()
    with TestClient(app) as client:
        for path in ("/rt/ws/a/b", "/rt/nope", "/ws"):
            with pytest.raises(WebSocketDisconnect), client.websocket_connect(path):
                pass  # pragma: no cover
        with client.websocket_connect("/rt/ws") as ws:
            assert ws.receive_json()["type"] == "welcome"


def test_decorators_keep_the_decorated_functions_type() -> None:
    """`@rc.handler(T)` returns the function as it is typed, not `Any`."""
    decorator = typing.get_type_hints(Roomcast.handler)["return"]
    takes, gives = typing.get_args(decorator)
    assert isinstance(gives, typing.TypeVar) and takes == [gives], decorator
    declared = typing.get_type_hints(Roomcast.server_envelope)
    assert isinstance(declared["return"], typing.TypeVar)
    assert declared["return"] is declared["envelope"]


async def test_a_client_gone_before_the_accept_leaves_nothing_attached() -> None:
    rc = Roomcast(Settings())
    async with RoomcastTest(rc):
        scope = {
            "type": "websocket",
            "path": "/ws",
            "root_path": "",
            "query_string": b"username=ann",
            "headers": [],
            "subprotocols": [],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "scheme": "ws",
        }

        async def receive() -> dict[str, Any]:
            return {"type": "websocket.connect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "websocket.accept":
                raise OSError("the client is gone")

        with pytest.raises(OSError):
            await rc(scope, receive, send)  # type: ignore[arg-type]
        assert (rc.hub.stats().connections, rc.hub.stats().users) == (0, 0)
