"""The wire contract: envelopes as tagged msgspec Structs, codes, the codec and the schema.

One union per direction, tagged on `type`. Unknown fields are ignored, new
fields get defaults, so old clients keep working.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, Union

import msgspec
from msgspec import Meta, Struct

PROTOCOL_VERSION: Final = 1
SUBPROTOCOL: Final = "roomcast.v1"
TOKEN_SUBPROTOCOL_PREFIX: Final = "roomcast.token."

ROOM_PATTERN: Final = r"^[A-Za-z0-9_.:\-]{1,64}$"
CLIENT_ID_PATTERN: Final = r"^[A-Za-z0-9_\-]{1,64}$"
_room_re = re.compile(ROOM_PATTERN)
_client_id_re = re.compile(CLIENT_ID_PATTERN)

RoomName = Annotated[
    str, Meta(pattern=ROOM_PATTERN, description="1-64 of A-Z a-z 0-9 _ - . : (case-sensitive)")
]
Ref = Annotated[str, Meta(max_length=64, description="the client's own id for a request")]
Level = Literal["info", "success", "warning", "error"]
ErrorCode = Literal[
    "invalid_json",
    "invalid_message",
    "unsupported_frame",
    "invalid_room",
    "not_joined",
    "forbidden",
    "too_many_rooms",
    "text_too_long",
    "rate_limited",
    "unauthorized",
    "origin_not_allowed",
    "too_many_connections",
    "internal",
]


class Close:
    """WebSocket close codes of the protocol."""

    NORMAL: Final = 1000
    POLICY_VIOLATION: Final = 1008
    TOO_BIG: Final = 1009
    SERVICE_RESTART: Final = 1012
    UNAUTHORIZED: Final = 4401
    FORBIDDEN: Final = 4403
    SLOW_CONSUMER: Final = 4408
    TOO_MANY: Final = 4429


def is_room_name(value: str) -> bool:
    return _room_re.match(value) is not None


def is_client_id(value: str) -> bool:
    return _client_id_re.match(value) is not None


def now() -> datetime:
    return datetime.now(UTC)


class Envelope(Struct, tag_field="type", kw_only=True):
    """Base of every envelope, in both directions."""


# --- client to server -------------------------------------------------------


class ClientEnvelope(Envelope):
    """Base of client requests. Subclass it (with a `tag`) to add your own type."""

    ref: Ref | None = None


class Since(Struct):
    epoch: str
    offset: Annotated[int, Meta(ge=0)]


class Join(ClientEnvelope, tag="join", kw_only=True):
    room: RoomName
    since: Since | None = None
    history: Annotated[int, Meta(ge=0)] | None = None


class Leave(ClientEnvelope, tag="leave", kw_only=True):
    room: RoomName


class SendChat(ClientEnvelope, tag="chat", kw_only=True):
    text: str
    room: RoomName | None = None


class GetPresence(ClientEnvelope, tag="presence", kw_only=True):
    room: RoomName


class Refresh(ClientEnvelope, tag="refresh", kw_only=True):
    token: str


class Ping(ClientEnvelope, tag="ping", kw_only=True):
    pass


CLIENT_TYPES: Final[tuple[type[ClientEnvelope], ...]] = (
    Join,
    Leave,
    SendChat,
    GetPresence,
    Refresh,
    Ping,
)
ClientMessage = Union[Join, Leave, SendChat, GetPresence, Refresh, Ping]  # noqa: UP007


# --- server to client -------------------------------------------------------


class User(Struct):
    id: str
    name: str


class ServerEnvelope(Envelope):
    """Base of what the server sends."""


class Welcome(ServerEnvelope, tag="welcome"):
    conn: str
    user: User
    heartbeat: int
    protocol: int = PROTOCOL_VERSION


class Joined(ServerEnvelope, tag="joined"):
    room: RoomName
    epoch: str
    offset: int
    recovered: bool
    online: int
    presence: list[User]
    ref: str | None = None


class Left(ServerEnvelope, tag="left"):
    room: RoomName
    ref: str | None = None


class Chat(ServerEnvelope, tag="chat"):
    room: RoomName
    epoch: str
    offset: int
    user: User
    text: str
    ts: datetime


class Notification(ServerEnvelope, tag="notification", kw_only=True):
    room: RoomName | None
    epoch: str | None
    offset: int | None
    title: str
    body: str
    level: Level = "info"
    data: Any = None
    ts: datetime


class System(ServerEnvelope, tag="system"):
    room: RoomName
    event: Literal["join", "leave"]
    user: User
    online: int
    ts: datetime


class Presence(ServerEnvelope, tag="presence"):
    room: RoomName
    online: int
    users: list[User]
    ref: str | None = None


class Ack(ServerEnvelope, tag="ack"):
    ref: str | None
    room: RoomName
    offset: int


class Error(ServerEnvelope, tag="error"):
    code: ErrorCode
    detail: str
    ref: str | None = None
    room: str | None = None


class Pong(ServerEnvelope, tag="pong"):
    ref: str | None = None


SERVER_TYPES: Final[tuple[type[ServerEnvelope], ...]] = (
    Welcome,
    Joined,
    Left,
    Chat,
    Notification,
    System,
    Presence,
    Ack,
    Error,
    Pong,
)
ServerMessage = Union[  # noqa: UP007
    Welcome, Joined, Left, Chat, Notification, System, Presence, Ack, Error, Pong
]


class PositionView(Struct):
    """The fields fan-out needs from an envelope it did not build: where it stands."""

    offset: int | None = None
    epoch: str | None = None


class RefView(Struct):
    """Just the `ref` of a request that failed to decode, to echo it in the error."""

    ref: Any = None


# --- encoding ---------------------------------------------------------------

_encoder = msgspec.json.Encoder()
position_decoder: Final = msgspec.json.Decoder(PositionView)
_ref_decoder = msgspec.json.Decoder(RefView)
server_decoder: Final = msgspec.json.Decoder(ServerMessage)


def encode(envelope: Envelope) -> str:
    """Encode once; the same text goes to every receiver."""
    return _encoder.encode(envelope).decode()


def ref_of(frame: str) -> str | None:
    """Best-effort `ref` of a frame that did not validate."""
    try:
        ref = _ref_decoder.decode(frame).ref
    except msgspec.DecodeError:
        return None
    return ref if isinstance(ref, str) and len(ref) <= 64 else None


class Codec:
    """The decoder for client requests, built once per app with its extra types."""

    def __init__(self, extra: Iterable[type[ClientEnvelope]] = ()) -> None:
        types = (*CLIENT_TYPES, *extra)
        tags = [t.__struct_config__.tag for t in types]
        duplicates = {tag for tag in tags if tags.count(tag) > 1}
        assert not duplicates, f"envelope types registered twice: {sorted(map(str, duplicates))}"
        self.decoder: msgspec.json.Decoder[ClientEnvelope] = msgspec.json.Decoder(
            Union[types]  # noqa: UP007
        )

    def decode(self, frame: str) -> ClientEnvelope:
        return self.decoder.decode(frame)


def schema(
    extra_client: Iterable[type[ClientEnvelope]] = (),
    extra_server: Iterable[type[ServerEnvelope]] = (),
) -> dict[str, Any]:
    """JSON Schema (2020-12) of every envelope, generated from the Structs."""
    client = Union[(*CLIENT_TYPES, *extra_client)]  # type: ignore[valid-type]
    server = Union[(*SERVER_TYPES, *extra_server)]  # type: ignore[valid-type]
    (client_schema, server_schema), components = msgspec.json.schema_components(
        (client, server), ref_template="#/$defs/{name}"
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "roomcast.v1",
        "title": "roomcast protocol v1",
        "description": "Every WebSocket frame is one JSON object of one of these envelopes.",
        "$defs": {
            **components,
            "ClientMessage": client_schema,
            "ServerMessage": server_schema,
        },
        "anyOf": [{"$ref": "#/$defs/ClientMessage"}, {"$ref": "#/$defs/ServerMessage"}],
    }
