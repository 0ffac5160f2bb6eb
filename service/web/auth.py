"""Who a connection is, and what it may do: anonymous identities, tokens, origins.

Pure functions of the request's values, no I/O. With `JWT_SECRET` set, every
WebSocket carries an HS256 token (PyJWT verifies it): `sub` and `name` make
the user, `exp` bounds the connection's life, and `rooms` (room names or
patterns where `*` matches any run of characters) limits what it may join.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import jwt

from ..protocol.envelopes import TOKEN_SUBPROTOCOL_PREFIX, User, is_client_id
from ..settings import bare_origin_problem

ALGORITHM: Final = "HS256"
MAX_SUBJECT_CHARS: Final = 256
PATTERN_RULE: Final = (
    "room names or patterns of A-Z a-z 0-9 _ - . : where * matches any run of characters"
)
_PATTERN_CHARS: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.:*"
)
_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def sanitize_name(raw: str | None, max_chars: int) -> str | None:
    """A display name without control or format characters (Unicode category C: no
    bidi overrides, no zero-width tricks), cut to `max_chars`; None when empty."""
    if not raw:
        return None
    cleaned = "".join(ch for ch in raw if not unicodedata.category(ch).startswith("C")).strip()
    return cleaned[:max_chars].strip() or None


ANONYMOUS_PREFIX: Final = "anon-"
ANONYMOUS_ID_HEX: Final = 20


def anonymous_id(client: str | None) -> str:
    """The public id of an anonymous user: derived from its secret `client` id when that
    is valid (stable across reconnects and workers, not reversible), else random.

    `client` itself is never shown to others: knowing a user's public id does not let
    anyone connect as that user.
    """
    if client and is_client_id(client):
        digest = hashlib.sha256(client.encode()).hexdigest()
    else:
        digest = secrets.token_hex(ANONYMOUS_ID_HEX // 2)
    return ANONYMOUS_PREFIX + digest[:ANONYMOUS_ID_HEX]


def anonymous_user(client: str | None, username: str | None, max_name_chars: int) -> User:
    """The user of an anonymous connection: `anonymous_id(client)`, and the sanitized
    `username`, else `guest-XXXX`."""
    name = sanitize_name(username, max_name_chars) or "guest-" + secrets.token_hex(2)
    return User(anonymous_id(client), name)


# --- tokens --------------------------------------------------------------------


class Unauthorized(Exception):
    """A token roomcast does not accept; `detail` says why (it never quotes the token)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Grant:
    """What a valid token says: who, which rooms (None: any), until when (None: no `exp`)."""

    user: User
    rooms: tuple[str, ...] | None = None
    expires: int | None = None

    def permits(self, room: str) -> bool:
        return room_permitted(room, self.rooms)


def token_from(query_token: str | None, subprotocols: Iterable[str]) -> str | None:
    """The connection's token: the `roomcast.token.<JWT>` subprotocol (the first one
    offered) wins over `?token=`, since it stays out of URLs and access logs."""
    for offered in subprotocols:
        if offered.startswith(TOKEN_SUBPROTOCOL_PREFIX):
            return offered[len(TOKEN_SUBPROTOCOL_PREFIX) :] or None
    return query_token or None


MISSING_TOKEN: Final = (
    "This server needs a token (JWT_SECRET is set): pass ?token=<JWT> or offer the "
    f"subprotocol {TOKEN_SUBPROTOCOL_PREFIX}<JWT> (with roomcast.v1)."
)


def verify_token(token: str | None, secret: str, max_name_chars: int) -> Grant:
    """The grant of a valid HS256 token, or `Unauthorized` saying what is wrong with it.

    `sub` is required (a non-blank string); `name` (a string), `exp` and
    `rooms` (a list of room names or `*` patterns) are optional. `aud` and
    `iss` are not checked; `iat` is not either (a backend's clock a second
    ahead must not refuse its fresh tokens), `nbf` is.
    """
    if not token:
        raise Unauthorized(MISSING_TOKEN)
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            # `sub` must be there; its type is checked below, with a clearer detail.
            options={
                "require": ["sub"],
                "verify_aud": False,
                "verify_iat": False,
                "verify_sub": False,
            },
        )
    except jwt.ExpiredSignatureError:
        raise Unauthorized("The token has expired (`exp`): get a new one.") from None
    except jwt.ImmatureSignatureError:
        raise Unauthorized("The token is not valid yet (`nbf`): check the clocks.") from None
    except jwt.InvalidSignatureError:
        raise Unauthorized(
            "The token's signature does not verify: it was not signed with this "
            "server's JWT_SECRET."
        ) from None
    except jwt.InvalidAlgorithmError:
        raise Unauthorized(f"The token must be signed with {ALGORITHM}.") from None
    except jwt.MissingRequiredClaimError:
        raise Unauthorized("The token has no `sub` claim: it names the user.") from None
    except jwt.DecodeError as exc:
        # PyJWT's messages describe the structure, never quote the token.
        raise Unauthorized(f"The token is not a valid JWT: {exc}.") from None
    except jwt.InvalidTokenError as exc:
        raise Unauthorized(f"The token is invalid: {exc}.") from None
    return _grant(claims, max_name_chars)


def _grant(claims: dict[str, Any], max_name_chars: int) -> Grant:
    sub = claims.get("sub")
    if (
        not isinstance(sub, str)
        or not sub.strip()
        or len(sub) > MAX_SUBJECT_CHARS
        or any(unicodedata.category(ch).startswith("C") for ch in sub)
    ):
        raise Unauthorized(
            f"The token's `sub` must be a non-blank string of at most {MAX_SUBJECT_CHARS} "
            "characters without control characters."
        )
    raw_name = claims.get("name")
    if raw_name is not None and not isinstance(raw_name, str):
        raise Unauthorized("The token's `name` must be a string.")
    name = sanitize_name(raw_name, max_name_chars) or sanitize_name(sub, max_name_chars) or sub
    rooms: tuple[str, ...] | None = None
    if "rooms" in claims:
        raw_rooms = claims["rooms"]
        if not isinstance(raw_rooms, list) or not all(isinstance(r, str) for r in raw_rooms):
            raise Unauthorized(f"The token's `rooms` must be a list of {PATTERN_RULE}.")
        rooms = tuple(raw_rooms)
    exp = claims.get("exp")
    expires = int(exp) if exp is not None else None  # PyJWT checked it is a number
    return Grant(User(sub, name), rooms, expires)


def mint_token(
    secret: str,
    sub: str,
    *,
    name: str | None = None,
    rooms: Sequence[str] | None = None,
    ttl: int | None = 3600,
    now: float | None = None,
) -> str:
    """An HS256 token in the format `verify_token` accepts (for tests and backends)."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"sub": sub, "iat": issued}
    if name is not None:
        claims["name"] = name
    if rooms is not None:
        claims["rooms"] = list(rooms)
    if ttl is not None:
        claims["exp"] = issued + ttl
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


# --- rooms -----------------------------------------------------------------------


def is_room_pattern(pattern: str) -> bool:
    """A pattern in the rooms alphabet plus `*`, 1 to 64 characters."""
    return 0 < len(pattern) <= 64 and all(ch in _PATTERN_CHARS for ch in pattern)


def room_permitted(room: str, patterns: Sequence[str] | None) -> bool:
    """Whether any pattern matches the whole room name (None permits every room)."""
    if patterns is None:
        return True
    return any(glob_match(pattern, room) for pattern in patterns)


def glob_match(pattern: str, name: str) -> bool:
    """`pattern` matches all of `name`, case-sensitively; `*` matches any run of
    characters (also none) and every other character only itself (`?` and `[`
    are not special). Linear backtracking: no regex, whatever the pattern."""
    p = n = 0
    star = -1  # position in pattern of the last `*` seen
    mark = 0  # position in name that this `*` currently absorbs up to
    while n < len(name):
        if p < len(pattern) and pattern[p] == "*":
            star, mark = p, n
            p += 1
        elif p < len(pattern) and pattern[p] == name[n]:
            p += 1
            n += 1
        elif star >= 0:
            mark += 1
            p, n = star + 1, mark
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


# --- origins ---------------------------------------------------------------------


def origin_allowed(origin: str | None, allowed: Sequence[str]) -> bool:
    """Whether a WebSocket with this `Origin` header may connect.

    Anything goes when ALLOWED_ORIGINS is unset or lists `*`; a client without an
    `Origin` (not a browser) is not refused. An `Origin` that is not a bare
    `scheme://host[:port]` (user information, a path) matches nothing. Origins
    compare as scheme, host and port, case-insensitively, default ports ignored.
    """
    if not allowed or origin is None or "*" in allowed:
        return True
    wanted = _normal_origin(origin)
    return wanted is not None and any(_normal_origin(a) == wanted for a in allowed)


def _normal_origin(origin: str) -> str | None:
    if bare_origin_problem(origin) is not None:
        return None  # `null` (a file or a sandboxed frame) too
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is not None and port != _DEFAULT_PORTS.get(parts.scheme):
        host += f":{port}"
    return f"{parts.scheme}://{host}"


def timer_at(
    old: asyncio.TimerHandle | None, at: int | None, callback: Callable[[], None]
) -> asyncio.TimerHandle | None:
    """Cancel `old`, and call `callback` at the Unix time `at` (a token's `exp`), if any."""
    if old is not None:
        old.cancel()
    if at is None:
        return None
    loop = asyncio.get_running_loop()
    return loop.call_at(loop.time() + (at - time.time()), callback)
