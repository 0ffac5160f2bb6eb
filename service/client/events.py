"""What the typed client raises and reports: `ClientError` subclasses (one per
error code or final close) and its own events, yielded among the envelopes."""

from __future__ import annotations

from typing import Final, Union

import msgspec

from ..errors import RoomcastError
from ..protocol.codes import Close
from ..protocol.envelopes import Error, Joined, ServerEnvelope, Welcome

# --- errors ----------------------------------------------------------------------


class ClientError(RoomcastError):
    """An `error` from the server (or a failure of the client), with its fields."""

    def __init__(
        self,
        code: str,
        detail: str,
        ref: str | None = None,
        room: str | None = None,
        close_code: int | None = None,
    ) -> None:
        super().__init__(detail)
        self.code, self.detail, self.ref, self.room = code, detail, ref, room
        self.close_code = close_code


class InvalidRoom(ClientError):
    """`invalid_room`: the name breaks the room-name rule."""


class NotJoined(ClientError):
    """`not_joined`: join the room first."""


class Forbidden(ClientError):
    """`forbidden` or `origin_not_allowed` (close 4403): do not retry."""


class Unauthorized(ClientError):
    """`unauthorized` (close 4401): missing, invalid or expired token."""


class TooManyRooms(ClientError):
    """`too_many_rooms`: the connection is in MAX_ROOMS rooms."""


class TextTooLong(ClientError):
    """`text_too_long`: the chat is over MAX_TEXT_CHARS."""


class RateLimited(ClientError):
    """`rate_limited` or `too_many_connections` (close 4429)."""


class InvalidRequest(ClientError):
    """`invalid_json`, `invalid_message` or `unsupported_frame`: a client bug."""


class ServerFailed(ClientError):
    """`internal`: the server failed on the request."""


class ConnectionFailed(ClientError):
    """The first connection could not be opened (server down, not a roomcast URL)."""


class Closed(ClientError):
    """The server closed the connection for good (1008, 1009, 1000), or the client was closed."""


class RequestTimeout(ClientError, TimeoutError):
    """No answer to a request within its timeout."""


_ERRORS: Final[dict[str, type[ClientError]]] = {
    "invalid_room": InvalidRoom,
    "not_joined": NotJoined,
    "forbidden": Forbidden,
    "origin_not_allowed": Forbidden,
    "unauthorized": Unauthorized,
    "too_many_rooms": TooManyRooms,
    "text_too_long": TextTooLong,
    "rate_limited": RateLimited,
    "too_many_connections": RateLimited,
    "invalid_json": InvalidRequest,
    "invalid_message": InvalidRequest,
    "unsupported_frame": InvalidRequest,
    "internal": ServerFailed,
}
_CLOSE_ERRORS: Final[dict[int, type[ClientError]]] = {
    Close.UNAUTHORIZED: Unauthorized,
    Close.FORBIDDEN: Forbidden,
    Close.TOO_MANY: RateLimited,
}


def error_of(error: Error, close_code: int | None = None) -> ClientError:
    """The typed exception of an `error` envelope."""
    kind = _ERRORS.get(error.code, ClientError)
    return kind(error.code, error.detail, error.ref, error.room, close_code)


def close_error(code: int | None, reason: str, last: Error | None) -> ClientError:
    """The exception of a final close: the `error` sent just before it, if any, explains it."""
    if last is not None:
        return error_of(last, code)
    kind = _CLOSE_ERRORS.get(code or 0, Closed)
    detail = f"The server closed the connection ({code} {reason})."
    return kind("closed", detail.replace(" )", ")"), None, None, code)


# --- the client's own events (yielded among the envelopes) -------------------------


class ClientEvent(msgspec.Struct, tag_field="type", frozen=True, kw_only=True):
    """Base of what the client itself reports; tagged like envelopes for JSON output."""


class Disconnected(ClientEvent, tag="disconnected", frozen=True, kw_only=True):
    """The connection was lost (`code` None: no close frame); the client reconnects."""

    code: int | None
    reason: str


class Reconnected(ClientEvent, tag="reconnected", frozen=True, kw_only=True):
    """A new connection is open; rooms are being rejoined with `since`."""

    attempts: int
    welcome: Welcome


class RecoveryFailed(ClientEvent, tag="recovery_failed", frozen=True, kw_only=True):
    """Rejoining `room` answered `recovered: false` (history lost or trimmed): reload it."""

    room: str
    joined: Joined


Event = Union[ServerEnvelope, ClientEvent]  # noqa: UP007
