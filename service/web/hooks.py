"""The application's hooks: who connects, who joins which room, what a chat may say.

Registered with `@rc.on_connect`, `@rc.on_join`, `@rc.on_chat`, `@rc.on_leave` and
`@rc.on_disconnect` (the HTTP hooks of `http_hooks` are registered the same way).
Several hooks of a kind run in the order they were registered, after the
protocol's own checks. A hook refuses with `Refuse` (at connect) or
`ProtocolError`; anything else it raises, and a hook that takes longer than
HOOK_TIMEOUT, is logged and fails closed: the request gets `internal`, and the
connection stays usable (a connect is refused with 1012: retry later).
"""

from __future__ import annotations

import asyncio
import logging
import unicodedata
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Generic, TypeVar

from ..errors import ProtocolError, Refuse, RoomcastError
from ..protocol.codes import Close, ErrorCode
from ..protocol.envelopes import User
from .auth import MAX_SUBJECT_CHARS, sanitize_name

log = logging.getLogger("roomcast.hooks")

S = TypeVar("S")


class HookFailed(RoomcastError):
    """A hook could not give an answer (an HTTP hook that did not answer, or answered
    badly): logged as it is, without a traceback; the request fails closed."""


class Hooks(Generic[S]):
    """The hooks of one app, by kind, in registration order."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.connect: list[Callable[[S], Awaitable[None]]] = []
        self.join: list[Callable[[S, str], Awaitable[None]]] = []
        self.chat: list[Callable[[S | None, str, str], Awaitable[str]]] = []
        self.leave: list[Callable[[S, str], Awaitable[None]]] = []
        self.disconnect: list[Callable[[S], Awaitable[None]]] = []
        self.admitting = 0  # connections in their connect hooks

    def at_connect(self, room: str | None) -> bool:
        """Whether any hook runs before the `welcome` of this connection."""
        return bool(self.connect or (room is not None and self.join))

    async def admit(self, socket: S, room: str | None) -> None:
        """The connect hooks, then (on `/ws/{room}`) the join hooks of that room; a
        refusal of either is a `Refuse` (no `welcome`)."""
        self.admitting += 1
        try:
            for connect in self.connect:
                await self._call("connect", connect, socket)
            if room is not None:
                for join in self.join:
                    await self._call("join", join, socket, room)
        except ProtocolError as exc:
            raise Refuse(_REFUSALS.get(exc.code, Close.FORBIDDEN), exc.detail, exc.code) from None
        finally:
            self.admitting -= 1

    async def authorize(self, socket: S, room: str) -> None:
        """The join hooks: `ProtocolError` refuses the join."""
        for join in self.join:
            await self._call("join", join, socket, room)

    async def moderate(self, socket: S | None, room: str, text: str, max_chars: int) -> str:
        """The chat hooks, each given the text the one before returned: the text to store."""
        for chat in self.chat:
            text = await self._call("chat", chat, socket, room, text)
            if not isinstance(text, str):
                log.error("chat hook %s returned %r, not the text to store", _name(chat), text)
                raise ProtocolError(ErrorCode.INTERNAL, _FAILED.format(kind="chat"))
        if not text.strip():
            raise ProtocolError(
                "invalid_message", "The message is empty once the application processed it."
            )
        if len(text) > max_chars:
            raise ProtocolError(
                "text_too_long",
                f"The message has {len(text)} characters once the application processed it; "
                f"at most {max_chars} (MAX_TEXT_CHARS).",
            )
        return text

    async def notify(
        self, kind: str, hooks: Iterable[Callable[..., Awaitable[None]]], *args: Any
    ) -> None:
        """Hooks that cannot refuse (leave, disconnect): a failure is only logged."""
        for hook in hooks:
            try:
                await self._call(kind, hook, *args)
            except RoomcastError as exc:
                log.warning("%s hook %s raised %r: ignored", kind, _name(hook), exc)

    async def departed(self, socket: S, rooms: Iterable[str]) -> None:
        """A connection ended: the leave hooks of each room it was in, then the disconnect
        hooks."""
        for room in rooms:
            await self.notify("leave", self.leave, socket, room)
        await self.notify("disconnect", self.disconnect, socket)

    async def _call(self, kind: str, hook: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        try:
            async with asyncio.timeout(self.timeout) as deadline:
                return await hook(*args)
        except (Refuse, ProtocolError):
            raise
        except HookFailed as exc:
            log.error("%s hook %s failed: %s", kind, _name(hook), exc)
        except TimeoutError:
            if not deadline.expired():
                log.exception("%s hook %s failed", kind, _name(hook))
            else:
                log.error(
                    "%s hook %s took over %ss (HOOK_TIMEOUT)", kind, _name(hook), self.timeout
                )
        except Exception:
            log.exception("%s hook %s failed", kind, _name(hook))
        raise ProtocolError(ErrorCode.INTERNAL, _FAILED.format(kind=kind))


_FAILED = "The application's {kind} hook failed: retry later."
# A refusal at connect time: its close code by the error's code.
_REFUSALS = {
    ErrorCode.UNAUTHORIZED: Close.UNAUTHORIZED,
    ErrorCode.INTERNAL: Close.SERVICE_RESTART,  # the client retries with backoff
    ErrorCode.TOO_MANY_CONNECTIONS: Close.TOO_MANY,
}


def _name(hook: Callable[..., Any]) -> str:
    return getattr(hook, "__qualname__", None) or repr(hook)


def checked_user(user: object, max_name_chars: int) -> User:
    """The identity an on_connect hook gives (`socket.user = User(...)`), checked like a
    token's `sub` and `name`: a wrong one is the hook's bug (TypeError, ValueError)."""
    if not isinstance(user, User):
        raise TypeError(f"socket.user must be a roomcast.User, not {type(user).__name__}")
    if (
        not isinstance(user.id, str)
        or not user.id.strip()
        or len(user.id) > MAX_SUBJECT_CHARS
        or any(unicodedata.category(ch).startswith("C") for ch in user.id)
    ):
        raise ValueError(
            f"User.id must be a non-blank string of at most {MAX_SUBJECT_CHARS} characters "
            f"without control characters, not {user.id!r:.80}"
        )
    if not isinstance(user.name, str):
        raise TypeError(f"User.name must be a string, not {type(user.name).__name__}")
    name = sanitize_name(user.name, max_name_chars) or sanitize_name(user.id, max_name_chars)
    return User(user.id, name or user.id[:max_name_chars])
