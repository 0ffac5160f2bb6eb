"""roomcast's exceptions: one root, `RoomcastError`, and its kinds."""

from __future__ import annotations

from .protocol.codes import Close, ErrorCode


class RoomcastError(Exception):
    """The root of every error roomcast raises on purpose."""


class SettingsError(RoomcastError, ValueError):
    """A setting has a value roomcast cannot run with; the message names the variable."""


class ProtocolError(RoomcastError):
    """A request roomcast refuses: sent to the client as an `error` envelope.

    Raise it from a handler or a hook: `ProtocolError("forbidden", "You may not join x.")`.
    """

    def __init__(self, code: ErrorCode | str, detail: str) -> None:
        super().__init__(detail)
        self.code = ErrorCode(code)
        self.detail = detail

    def __repr__(self) -> str:
        return f"ProtocolError({self.code.value!r}, {self.detail!r})"


class Refuse(RoomcastError):
    """A connection refused at connect time: the client gets one `error` saying why, then
    the close `code`, and no `welcome` (a browser cannot see a refused handshake's status).

    Raise it from an `on_connect` hook: `Refuse(4401, "Log in first.")`.
    """

    def __init__(self, code: int, detail: str, error: ErrorCode | str | None = None) -> None:
        super().__init__(detail)
        self.code = Close(code)
        self.detail = detail
        self.error = ErrorCode(error) if error is not None else _REFUSAL_ERRORS[self.code]

    def __repr__(self) -> str:
        return f"Refuse({int(self.code)}, {self.detail!r})"


_REFUSAL_ERRORS = {
    Close.NORMAL: ErrorCode.INTERNAL,
    Close.POLICY_VIOLATION: ErrorCode.INVALID_ROOM,
    Close.TOO_BIG: ErrorCode.INVALID_MESSAGE,
    Close.SERVICE_RESTART: ErrorCode.INTERNAL,
    Close.UNAUTHORIZED: ErrorCode.UNAUTHORIZED,
    Close.FORBIDDEN: ErrorCode.FORBIDDEN,
    Close.SLOW_CONSUMER: ErrorCode.INTERNAL,
    Close.TOO_MANY: ErrorCode.TOO_MANY_CONNECTIONS,
}
