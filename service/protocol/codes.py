"""The protocol's codes: WebSocket close codes and `error` codes, each described.

`Close` members are ints and `ErrorCode` members are strs, so they go on the
wire (and into `websocket.close`) as they are; their descriptions feed the
AsyncAPI document and the README's tables.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class Close(IntEnum):
    """WebSocket close codes of the protocol: when each is sent, and what a client does."""

    when: str
    client: str

    def __new__(cls, code: int, when: str = "", client: str = "") -> Close:
        member = int.__new__(cls, code)
        member._value_ = code
        member.when = when
        member.client = client
        return member

    NORMAL = 1000, "normal close", "nothing"
    POLICY_VIOLATION = (
        1008,
        "invalid room in the path; or 50 consecutive bad frames, each answered with `error`",
        "fix the client",
    )
    TOO_BIG = 1009, "a frame over MAX_MESSAGE_BYTES", "fix the client"
    SERVICE_RESTART = (
        1012,
        "the server is shutting down or restarting (within 5 s of SIGTERM), or a room lost "
        "its history",
        "reconnect with backoff and recover (join with `since`)",
    )
    UNAUTHORIZED = 4401, "missing, invalid or expired token", "get a new token first"
    FORBIDDEN = (
        4403,
        "origin not allowed, or the token does not permit the room of /ws/{room}",
        "do not retry",
    )
    SLOW_CONSUMER = (
        4408,
        "slow consumer: the connection's outbox overflowed",
        "reconnect and recover (join with `since`)",
    )
    TOO_MANY = (
        4429,
        "too many connections (MAX_CONNECTIONS, or CONNECT_RATE from one address); or the "
        "10th frame over RATE_LIMIT within a minute",
        "retry later with backoff",
    )


class ErrorCode(StrEnum):
    """The `code` of an `error` envelope."""

    description: str

    def __new__(cls, code: str, description: str = "") -> ErrorCode:
        member = str.__new__(cls, code)
        member._value_ = code
        member.description = description
        return member

    INVALID_JSON = "invalid_json", "the frame is not valid JSON"
    INVALID_MESSAGE = "invalid_message", "the frame is JSON but not a valid envelope"
    UNSUPPORTED_FRAME = "unsupported_frame", "a binary frame: send text"
    INVALID_ROOM = "invalid_room", "the room name breaks the room-name rule"
    NOT_JOINED = "not_joined", "the request needs the room joined first"
    FORBIDDEN = "forbidden", "the token (or the application) does not permit the room"
    TOO_MANY_ROOMS = "too_many_rooms", "the connection is in MAX_ROOMS rooms already"
    TEXT_TOO_LONG = "text_too_long", "the text is over MAX_TEXT_CHARS (or the broker's limit)"
    RATE_LIMITED = "rate_limited", "more frames than RATE_LIMIT allows"
    UNAUTHORIZED = "unauthorized", "missing, invalid or expired token"
    ORIGIN_NOT_ALLOWED = "origin_not_allowed", "the page's origin is not in ALLOWED_ORIGINS"
    TOO_MANY_CONNECTIONS = "too_many_connections", "MAX_CONNECTIONS or CONNECT_RATE reached"
    INTERNAL = "internal", "the server failed on this request: retry"
