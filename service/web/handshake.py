"""The checks a WebSocket passes before its `welcome`: connection rate, capacity, origin,
room, identity.

Pure functions of the request's values and the settings, no I/O: a refusal is
a `Refuse` (the close code, the error code and a sentence), which the endpoint
turns into one `error` frame and the close.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from starlette.datastructures import Address

from ..engine.limits import ConnectRate
from ..errors import Refuse
from ..protocol.codes import Close, ErrorCode
from ..protocol.envelopes import SUBPROTOCOL, Since, User, is_room_name
from ..settings import Settings
from .auth import Unauthorized, anonymous_user, origin_allowed, token_from, verify_token

log = logging.getLogger("roomcast.sockets")

ROOM_RULE: Final = "Room names are 1 to 64 characters of A-Z a-z 0-9 _ - . : (case-sensitive)"


@dataclass(frozen=True, slots=True)
class Admission:
    """Who connects, which rooms its token permits (None: any) and until when."""

    user: User
    permitted: tuple[str, ...] | None = None
    expires: int | None = None


def subprotocol_of(offered: Sequence[str]) -> str | None:
    """What the server selects: `roomcast.v1` when offered; never the token's
    subprotocol (the handshake's answer would echo it)."""
    return SUBPROTOCOL if SUBPROTOCOL in offered else None


class TooFast(Refuse):
    """CONNECT_RATE refused the connection (4429, as MAX_CONNECTIONS does)."""


@dataclass(frozen=True, slots=True)
class Attempt:
    """Where a connection comes from and when: the address uvicorn settled on after
    FORWARDED_ALLOW_IPS (None for a Unix socket), the monotonic clock, and the
    per-address buckets of CONNECT_RATE."""

    address: str | None
    now: float
    rate: ConnectRate

    @classmethod
    def of(cls, client: Address | None, rate: ConnectRate) -> Attempt:
        """The attempt of a socket from `client` (Starlette's `websocket.client`), now."""
        host = client.host if client is not None else None
        return cls(host, asyncio.get_running_loop().time(), rate)


def admit(
    settings: Settings,
    connections: int,
    attempt: Attempt,
    headers: Mapping[str, str],
    query: Mapping[str, str],
    offered: Sequence[str],
    room: str | None,
) -> Admission:
    """The connection's identity, or `Refuse` saying why it may not connect."""
    if attempt.address is not None and not attempt.rate.allow(attempt.address, attempt.now):
        raise TooFast(
            Close.TOO_MANY,
            f"Too many connections from your address: at most {settings.connect_rate} per "
            "second (CONNECT_RATE). Reconnect with backoff.",
        )
    if connections >= settings.max_connections:
        raise Refuse(
            Close.TOO_MANY,
            f"This server holds its maximum of {settings.max_connections} connections "
            "(MAX_CONNECTIONS): retry later with backoff.",
        )
    origin = headers.get("origin")
    if not origin_allowed(origin, settings.allowed_origins):
        log.info("refused a connection from origin %r (ALLOWED_ORIGINS)", origin)
        raise Refuse(
            Close.FORBIDDEN,
            f"Pages from {origin!r} may not connect here: the server's ALLOWED_ORIGINS "
            "does not list it.",
            "origin_not_allowed",
        )
    if room is not None and not is_room_name(room):
        raise Refuse(Close.POLICY_VIOLATION, f"{ROOM_RULE}; got {room!r}.")
    if settings.jwt_secret is None:
        return Admission(
            anonymous_user(query.get("client"), query.get("username"), settings.max_name_chars)
        )
    try:
        grant = verify_token(
            token_from(query.get("token"), offered),
            str(settings.jwt_secret),
            settings.max_name_chars,
        )
    except Unauthorized as exc:
        log.info("refused a connection: %s", exc.detail)
        raise Refuse(Close.UNAUTHORIZED, exc.detail) from None
    if room is not None and not grant.permits(room):
        log.info("refused user %r the room %r: not in its token", grant.user.id, room)
        raise Refuse(Close.FORBIDDEN, f"Your token does not permit room {room!r}.")
    return Admission(grant.user, grant.rooms, grant.expires)


def join_query(since_raw: str | None, history_raw: str | None) -> tuple[Since | None, int | None]:
    """`?since=EPOCH:OFFSET` and `?history=N` of `/ws/{room}`; ValueError when malformed."""
    since: Since | None = None
    history: int | None = None
    if since_raw:
        epoch, _, offset = since_raw.rpartition(":")
        since = Since(epoch, int(offset))
        if not epoch or since.offset < 0:
            raise ValueError(since_raw)
    if history_raw:
        history = int(history_raw)
        if history < 0:
            raise ValueError(history_raw)
    return since, history


_REASONS = {
    ErrorCode.TOO_MANY_CONNECTIONS: "max_connections",
    ErrorCode.ORIGIN_NOT_ALLOWED: "origin",
    ErrorCode.UNAUTHORIZED: "unauthorized",
    ErrorCode.FORBIDDEN: "forbidden",
    ErrorCode.INVALID_ROOM: "invalid_room",
}


def refusal_reason(refusal: Refuse) -> str:
    """The `reason` label of a refused connection (metrics.REFUSALS)."""
    return "connect_rate" if isinstance(refusal, TooFast) else _REASONS.get(refusal.error, "other")
