"""Client helpers for end-to-end tests against a real server (see servers.py).

Every frame a `Client` receives is checked to be a text frame holding one
JSON object that validates against the server's own `/schema.json`
(`ServerMessage`). Every wait is bounded: `TIMEOUT` unless told otherwise.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from jsonschema import Draft202012Validator
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from .servers import Server

TIMEOUT = 5.0
SUBPROTOCOL = "roomcast.v1"

Message = dict[str, Any]

_validators: dict[tuple[int, int], Draft202012Validator] = {}


# --- HTTP ----------------------------------------------------------------------


def http(
    server: Server,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    """(status, decoded JSON body) of a request with a JSON (or `raw`) body, also
    for 4xx/5xx answers, which must be JSON too."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        server.http + path, data=data, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            status, payload = response.status, response.read()
            kind = response.headers.get("content-type")
    except urllib.error.HTTPError as exc:
        with exc:
            status, payload, kind = exc.code, exc.read(), exc.headers.get("content-type")
    assert kind == "application/json", (status, kind, payload)
    return status, json.loads(payload)


def http_get(server: Server, path: str) -> tuple[int, Any]:
    return http(server, "GET", path)


async def get(server: Server, path: str) -> tuple[int, Any]:
    return await asyncio.wait_for(asyncio.to_thread(http_get, server, path), TIMEOUT + 1)


GAUGES = ("connections", "rooms", "users", "subscriptions", "tasks")


def counts(server: Server) -> dict[str, int]:
    """The server's gauges from /metrics (`roomcast_connections` as `connections`, …)."""
    with urllib.request.urlopen(server.http + "/metrics", timeout=TIMEOUT) as response:
        text = response.read().decode()
    found: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("roomcast_") and name[len("roomcast_") :] in GAUGES:
            found[name[len("roomcast_") :]] = int(float(value))
    assert set(found) == set(GAUGES), text
    return found


async def wait_counts(server: Server, within: float = 10.0, **expected: int) -> dict[str, int]:
    """Poll the gauges of /metrics until every given one has the expected value."""
    deadline = time.monotonic() + within
    while True:
        found = await asyncio.wait_for(asyncio.to_thread(counts, server), TIMEOUT + 1)
        if all(found[key] == value for key, value in expected.items()):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"/metrics never reached {expected}: last {found}")
        await asyncio.sleep(0.02)  # polling interval, bounded by the deadline


def validator(server: Server) -> Draft202012Validator:
    """The ServerMessage validator of this server's /schema.json (fetched once)."""
    key = (server.process.pid, server.port)
    found = _validators.get(key)
    if found is None:
        status, schema = http_get(server, "/schema.json")
        assert status == 200, schema
        Draft202012Validator.check_schema(schema)
        found = _validators[key] = Draft202012Validator(
            {"$ref": "#/$defs/ServerMessage", "$defs": schema["$defs"]}
        )
    return found


# --- WebSocket -----------------------------------------------------------------


class Client:
    """One WebSocket connection; frames are received strictly in order."""

    def __init__(self, ws: ClientConnection, schema: Draft202012Validator) -> None:
        self.ws = ws
        self.schema = schema
        self.welcome: Message = {}
        self.joined: Message = {}

    @property
    def subprotocol(self) -> str | None:
        return self.ws.subprotocol

    @property
    def user(self) -> Message:
        return self.welcome["user"]  # type: ignore[no-any-return]

    async def send(self, message: Message | str | bytes) -> None:
        data = json.dumps(message) if isinstance(message, dict) else message
        try:
            await asyncio.wait_for(self.ws.send(data), TIMEOUT)
        except TimeoutError:
            raise AssertionError(f"sending took over {TIMEOUT}s: {data!r:.80}") from None

    async def recv(self, within: float = TIMEOUT) -> Message:
        """The next frame, decoded and validated against the server's schema."""
        try:
            frame = await asyncio.wait_for(self.ws.recv(), within)
        except TimeoutError:
            raise AssertionError(f"no frame within {within}s") from None
        assert isinstance(frame, str), f"server sent a binary frame: {frame!r}"
        message = json.loads(frame)
        assert isinstance(message, dict), f"frame is not a JSON object: {frame}"
        errors = [e.message for e in self.schema.iter_errors(message)]
        assert not errors, f"frame does not validate against /schema.json: {frame}: {errors}"
        return message

    async def recv_type(self, type_: str, within: float = TIMEOUT, **fields: Any) -> Message:
        """The next frame, which must be of `type_` and have the given field values."""
        message = await self.recv(within)
        assert message["type"] == type_, f"expected {type_!r}, got {message}"
        for key, value in fields.items():
            assert message.get(key) == value, f"expected {key}={value!r} in {message}"
        return message

    async def recv_many(self, count: int, within: float = TIMEOUT) -> list[Message]:
        """The next `count` frames, all within `within` seconds."""
        frames: list[Message] = []
        deadline = time.monotonic() + within
        while len(frames) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{len(frames)} of {count} frames in {within}s: {frames}")
            try:
                frames.append(await self.recv(left))
            except AssertionError as exc:
                raise AssertionError(f"after {len(frames)} of {count}: {frames}: {exc}") from None
        return frames

    async def drain_until(
        self, predicate: Callable[[Message], bool], within: float = TIMEOUT
    ) -> list[Message]:
        """Frames up to and including the first one matching `predicate`.

        Only for places where the protocol leaves the order open.
        """
        frames: list[Message] = []
        deadline = time.monotonic() + within
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching frame within {within}s; got {frames}")
            frames.append(await self.recv(left))
            if predicate(frames[-1]):
                return frames

    async def ping(self, ref: str = "p") -> None:
        """Prove the connection is usable: the next frame answers a ping."""
        await self.send({"type": "ping", "ref": ref})
        await self.recv_type("pong", ref=ref)

    async def chat(
        self, text: str, room: str | None = None, ref: str | None = None
    ) -> tuple[Message, Message]:
        """Send a chat; the next two frames must be its ack and own copy (either order)."""
        message: Message = {"type": "chat", "text": text}
        if room is not None:
            message["room"] = room
        if ref is not None:
            message["ref"] = ref
        await self.send(message)
        return await self.ack_and_chat(text, ref)

    async def ack_and_chat(self, text: str, ref: str | None = None) -> tuple[Message, Message]:
        """The next two frames: the ack of our chat and our own copy of it, in either order."""
        first, second = await self.recv_many(2)
        ack, own = (first, second) if first["type"] == "ack" else (second, first)
        assert (ack["type"], own["type"]) == ("ack", "chat"), [first, second]
        assert ack["ref"] == ref, ack
        assert own["text"] == text and own["user"] == self.user, own
        assert ack["offset"] == own["offset"] and ack["room"] == own["room"], [ack, own]
        return ack, own

    async def pour(self, room: str, texts: Sequence[str], within: float = 30) -> None:
        """Send chats without waiting between them, reading meanwhile (a sender that
        does not read is a slow consumer) until every one is acknowledged."""

        async def drain() -> None:
            acks = 0
            while acks < len(texts):
                acks += (await self.recv(within))["type"] == "ack"

        reading = asyncio.create_task(drain())
        for text in texts:
            await self.send({"type": "chat", "room": room, "text": text})
        await asyncio.wait_for(reading, within)

    async def join(self, room: str, ref: str | None = None, **fields: Any) -> Message:
        message: Message = {"type": "join", "room": room, **fields}
        if ref is not None:
            message["ref"] = ref
        await self.send(message)
        return await self.recv_type("joined", room=room, ref=ref)

    async def expect_close(self, code: int, within: float = TIMEOUT) -> list[Message]:
        """The frames before the server closes with `code`."""
        frames: list[Message] = []
        deadline = time.monotonic() + within
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"not closed within {within}s; got {frames}")
            try:
                frames.append(await self.recv(left))
            except ConnectionClosed as exc:
                assert exc.rcvd is not None, f"closed without a close frame: {exc!r}"
                assert exc.rcvd.code == code, f"closed with {exc.rcvd.code}, expected {code}"
                return frames

    async def close(self) -> None:
        async with _within(TIMEOUT, "closing"):
            await self.ws.close()


@asynccontextmanager
async def _within(seconds: float, what: str) -> AsyncIterator[None]:
    """asyncio.timeout that says what took too long."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise AssertionError(f"{what} took over {seconds}s") from None


def ws_url(server: Server, path: str = "/ws", **query: str | None) -> str:
    params = {k: v for k, v in query.items() if v is not None}
    return server.ws + path + ("?" + urllib.parse.urlencode(params) if params else "")


@asynccontextmanager
async def client(
    server: Server,
    path: str = "/ws",
    *,
    subprotocols: Sequence[str] | None = (SUBPROTOCOL,),
    welcome: bool = True,
    **query: str | None,
) -> AsyncIterator[Client]:
    """Connect (offering roomcast.v1 unless told otherwise).

    With `welcome` (the default) the first frame must be `welcome`; it is kept
    as `.welcome`. On `/ws/{room}` the `joined` that follows is left to the test
    (see `room_client`).
    """
    schema = validator(server)
    url = ws_url(server, path, **query)
    async with _within(TIMEOUT + 1, f"connecting to {url}"):
        ws = await connect(
            url,
            subprotocols=[Subprotocol(s) for s in subprotocols] if subprotocols else None,
            open_timeout=TIMEOUT,
            close_timeout=TIMEOUT,
            ping_interval=None,
        )
    conn = Client(ws, schema)
    try:
        if welcome:
            conn.welcome = await conn.recv_type("welcome")
        yield conn
    finally:
        async with _within(TIMEOUT + 1, f"closing {url}"):
            await ws.close()


@asynccontextmanager
async def room_client(server: Server, room: str, **query: Any) -> AsyncIterator[Client]:
    """Connect to `/ws/{room}`: `welcome`, then `joined` for the room (kept as `.joined`)."""
    async with client(server, f"/ws/{room}", **query) as conn:
        conn.joined = await conn.recv_type("joined", room=room, ref=None)
        yield conn


@asynccontextmanager
async def room_of(server: Server, room: str, count: int) -> AsyncIterator[list[Client]]:
    """`count` users joining `room` one after another, each announced to the earlier ones.

    Every client has read everything up to the last join when this yields.
    """
    async with AsyncExitStack() as stack:
        members: list[Client] = []
        for index in range(count):
            member = await stack.enter_async_context(room_client(server, room))
            assert member.joined["online"] == index + 1, member.joined
            for earlier in members:
                await earlier.recv_type(
                    "system", room=room, event="join", user=member.user, online=index + 1
                )
            members.append(member)
        yield members
