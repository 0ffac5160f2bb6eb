"""Arbitrary frames never crash the endpoint and never leak a membership."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from roomcast import Roomcast, Settings

from ..strategies import MAX_BYTES, deep, json_values

ALLOWED_CLOSES = {1008, 1009, 4408, 4429}

room_names = st.sampled_from(["a", "b", "lobby", "x.y:z-1", "", "bad room", "é", "r" * 65])
envelopes = st.fixed_dictionaries(
    {"type": st.sampled_from(["join", "leave", "chat", "presence", "refresh", "ping", "nope"])},
    optional={
        "room": room_names | json_values,
        "text": st.text(max_size=50) | json_values,
        "ref": st.text(max_size=70) | json_values,
        "since": st.fixed_dictionaries({"epoch": st.text(max_size=8), "offset": st.integers()})
        | json_values,
        "history": st.integers(min_value=-5, max_value=2000) | json_values,
        "token": json_values,
    },
)
deep_frames = st.builds(
    lambda head, nested: head + nested + ("}" if nested.endswith(("]", "}")) else ""),
    st.sampled_from(
        [
            '{"type": "chat", "room": "lobby", "text": "x", "x": ',
            '{"type": "join", "room": "a", "since": ',
            '{"ref": "r", "type": "ping", "data": ',
            '{"type": ',
        ]
    ),
    deep,
)
# Very wide: thousands of keys or items, within MAX_MESSAGE_BYTES.
wide_frames = st.builds(
    lambda kind, width, base: json.dumps(
        {**base, **{f"k{i}": i for i in range(width)}}
        if kind == "keys"
        else {**base, "room": list(range(width))}
    ),
    st.sampled_from(["keys", "items"]),
    st.integers(min_value=100, max_value=1200),
    st.sampled_from(
        [{"type": "chat", "room": "lobby", "text": "w"}, {"type": "ping"}, {"type": "join"}]
    ),
)
frames = st.one_of(
    envelopes.map(json.dumps),
    st.text(max_size=80),
    st.binary(max_size=40),
    json_values.map(json.dumps),
    deep_frames,
    wide_frames,
    st.just("x" * (MAX_BYTES + 100)),  # over MAX_MESSAGE_BYTES
)


@pytest.fixture(scope="module")
def app_client() -> Iterator[tuple[Roomcast, TestClient]]:
    rc = Roomcast(
        Settings(
            rate_limit=100000,
            connect_rate=0,  # hypothesis connects hundreds of times from one address
            max_message_bytes=MAX_BYTES,
            max_rooms=3,
            history_size=50,
            outbox_size=40,
        )
    )
    with TestClient(rc) as client:
        yield rc, client


def _receive_until_pong(ws: Any, ref: str) -> None:
    for _ in range(10_000):
        message = ws.receive()
        if message["type"] == "websocket.close":
            assert message.get("code") in ALLOWED_CLOSES, message
            return
        frame = json.loads(message["text"])
        if frame["type"] == "pong" and frame["ref"] == ref:
            return
        assert frame["type"] != "error" or frame["code"] != "internal", frame
    raise AssertionError("no pong")


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(path=st.sampled_from(["/ws", "/ws/lobby", "/ws/a"]), sent=st.lists(frames, max_size=12))
def test_arbitrary_frames_never_crash_or_leak(
    app_client: tuple[Roomcast, TestClient], path: str, sent: list[str | bytes]
) -> None:
    rc, client = app_client
    try:
        with client.websocket_connect(path) as ws:
            assert json.loads(ws.receive_text())["type"] == "welcome"
            for frame in sent:
                if isinstance(frame, bytes):
                    ws.send_bytes(frame)
                else:
                    ws.send_text(frame)
            ws.send_text(json.dumps({"type": "ping", "ref": "fuzz-end"}))
            _receive_until_pong(ws, "fuzz-end")
    except WebSocketDisconnect as exc:
        assert exc.code in ALLOWED_CLOSES
    # The server finishes its clean-up after the client saw the close: wait for it.
    assert wait_until(lambda: released(rc)), rc.hub.stats()


def released(rc: Roomcast) -> bool:
    stats = rc.hub.stats()
    counts = (stats.connections, stats.rooms, stats.subscriptions, stats.users, stats.tasks)
    return counts == (0, 0, 0, 0, 0) and len(rc.hub.presence) == 0  # type: ignore[arg-type]


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True
