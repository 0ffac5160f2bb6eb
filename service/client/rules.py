"""The client's rules, without I/O: URLs, backoff, token timing, and the offsets seen."""

from __future__ import annotations

import random
from typing import Any, Final
from urllib.parse import urlencode, urlsplit, urlunsplit

import jwt

from ..protocol.codes import Close
from ..protocol.envelopes import Joined, Since

# Closes after which reconnecting cannot help: the client must change first.
FINAL_CLOSES: Final = frozenset({Close.FORBIDDEN, Close.POLICY_VIOLATION, Close.TOO_BIG})


def ws_endpoint(url: str, query: dict[str, str]) -> str:
    """`url` (ws://host:port, .../ws, or http(s)://) as the multiplexed `/ws` endpoint."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"expected a ws:// or wss:// URL, got {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/ws"):
        path += "/ws"
    params = "&".join(p for p in (parts.query, urlencode(query)) if p)
    return urlunsplit((scheme, parts.netloc, path, params, ""))


def token_expiry(token: str) -> float | None:
    """The token's `exp` (read without verifying: the server does that)."""
    try:
        claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, int | float) else None


def refresh_margin(seconds_left: float) -> float:
    """How long before `exp` to refresh: a quarter of what is left, within 1-60 s."""
    return min(60.0, max(1.0, seconds_left / 4))


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter (attempt 0, 1, 2 …)."""
    return random.uniform(0, min(cap, base * 2**attempt))


class Positions(dict[str, Since]):
    """Joined rooms and the last offset queued in each: no offset is yielded twice,
    and a reconnect rejoins with `since` from here."""

    def seen(self, room: str | None, epoch: str | None, offset: int) -> bool:
        """Whether a stored envelope was queued before."""
        last = self.get(room) if room is not None else None
        return last is not None and last.epoch == epoch and offset <= last.offset

    def record(self, room: str | None, epoch: str | None, offset: int) -> None:
        if room is not None and epoch is not None:
            self[room] = Since(epoch, offset)

    def joined(self, joined: Joined) -> None:
        last = self.get(joined.room)
        if last is None or last.epoch != joined.epoch or last.offset < joined.offset:
            self[joined.room] = Since(joined.epoch, joined.offset)
