"""What the PostgreSQL backends share: the pool they open, and text escaping."""

from __future__ import annotations

import re
from typing import Any, Final

import asyncpg

# Seconds a call to PostgreSQL may take before it fails (a server that stops answering).
CALL_TIMEOUT: Final = 10.0


async def create_pool(url: str, name: str, size: int) -> Any:
    """An asyncpg pool whose connections and calls time out after CALL_TIMEOUT."""
    return await asyncpg.create_pool(
        url,
        min_size=1,
        max_size=size,
        timeout=CALL_TIMEOUT,
        command_timeout=CALL_TIMEOUT,
        server_settings={"application_name": name},
    )


# PostgreSQL text holds neither NUL nor lone surrogates: escape them (and the
# escape character), injectively, and undo it when reading.
_ESCAPE: Final = re.compile("[\\\\\x00\ud800-\udfff]")
_UNESCAPE: Final = re.compile(r"\\(\\|0|u[0-9a-f]{4})")


def _escape_one(match: re.Match[str]) -> str:
    c = match.group()
    return "\\\\" if c == "\\" else "\\0" if c == "\x00" else f"\\u{ord(c):04x}"


def _unescape_one(match: re.Match[str]) -> str:
    code = match.group(1)
    return "\\" if code == "\\" else "\x00" if code == "0" else chr(int(code[1:], 16))


def text(value: str) -> str:
    """`value` as PostgreSQL text can hold it."""
    return _ESCAPE.sub(_escape_one, value)


def untext(value: str) -> str:
    """The inverse of `text`."""
    return _UNESCAPE.sub(_unescape_one, value) if "\\" in value else value
