"""Who a connection is: anonymous identities now, tokens (JWT_SECRET) later.

Pure functions of the request's values, no I/O.
"""

from __future__ import annotations

import secrets
import unicodedata

from .envelopes import User, is_client_id


def sanitize_name(raw: str | None, max_chars: int) -> str | None:
    """A display name without control or format characters (Unicode category C: no
    bidi overrides, no zero-width tricks), cut to `max_chars`; None when empty."""
    if not raw:
        return None
    cleaned = "".join(ch for ch in raw if not unicodedata.category(ch).startswith("C")).strip()
    return cleaned[:max_chars].strip() or None


def anonymous_user(client: str | None, username: str | None, max_name_chars: int) -> User:
    """The user of an anonymous connection.

    Its id is the client's stable `client` id when valid (so presence and
    idempotent chats survive reconnects), else a fresh one; its name is the
    sanitized `username`, else `guest-XXXX`.
    """
    user_id = client if client and is_client_id(client) else "anon-" + secrets.token_hex(8)
    name = sanitize_name(username, max_name_chars) or "guest-" + secrets.token_hex(2)
    return User(user_id, name)
