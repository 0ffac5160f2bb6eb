"""The envelopes: every frame of the protocol as a tagged msgspec Struct.

One union per direction, tagged on `type`. Unknown fields are ignored, new
fields get defaults, so old clients keep working.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, Union

from msgspec import Meta, Struct

from .codes import ErrorCode

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


class FrameView(Struct):
    """The fields fan-out needs from an envelope it did not build: its kind and position."""

    type: str = ""
    offset: int | None = None
    epoch: str | None = None


class SystemView(Struct):
    """The user a `system` event is about (who is not sent it)."""

    user: User


class RequestView(Struct):
    """What can be salvaged from a request that does not validate: its `ref` and `room`."""

    ref: Any = None
    room: Any = None
