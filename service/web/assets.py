"""The pages' static files and the headers every page is served with.

Assets live in `templates/static/` (the package data `roomcast.templates`), are
read once at start-up, and are served with a strong ETag (their content
hash): a request with `If-None-Match` gets 304. A URL that carries the hash
(`url_for`, e.g. `static/chat.js?v=1a2b3c4d`) may be cached for a year;
without it the browser revalidates (`no-cache`), so a stable URL such as
`/roomcast.js` never serves a stale client after an upgrade.
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

IMMUTABLE: Final = "public, max-age=31536000, immutable"
REVALIDATE: Final = "no-cache"
_TYPES: Final = {".js": "text/javascript", ".css": "text/css", ".ts": "text/plain"}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    etag: str  # quoted, strong
    media_type: str

    @property
    def version(self) -> str:
        return self.etag.strip('"')[:12]


def asset(body: bytes, name: str) -> Asset:
    suffix = Path(name).suffix
    media = _TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
    if media.startswith("text/") or media == "application/json":
        media += "; charset=utf-8"
    return Asset(body, f'"{hashlib.sha256(body).hexdigest()[:32]}"', media)


class Assets:
    """Every file of a folder, in memory, by name."""

    def __init__(self, folder: Path) -> None:
        self.files: dict[str, Asset] = {
            path.name: asset(path.read_bytes(), path.name)
            for path in sorted(folder.iterdir())
            if path.is_file() and not path.name.startswith(".")
        }

    def add(self, name: str, body: bytes) -> None:
        """An asset made at start-up (generated from the app's own types, say)."""
        self.files[name] = asset(body, name)

    def url_for(self, name: str) -> str:
        """The relative URL of `static/<name>`, with its version (cached for a year)."""
        return f"static/{name}?v={self.files[name].version}"

    def response(self, request: Request, name: str) -> Response:
        found = self.files.get(name)
        if found is None:
            return PlainTextResponse("Not Found", 404)
        versioned = request.query_params.get("v") == found.version
        headers = {
            "ETag": found.etag,
            "Cache-Control": IMMUTABLE if versioned else REVALIDATE,
            "X-Content-Type-Options": "nosniff",
        }
        if found.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(found.body, headers=headers, media_type=found.media_type)


def page_headers(request: Request) -> dict[str, str]:
    """The security headers of every HTML page: no inline script or style, no framing,
    WebSockets to this host only."""
    host = request.headers.get("host", "")
    csp = "; ".join(
        (
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            f"connect-src 'self' ws://{host} wss://{host}",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
            "object-src 'none'",
        )
    )
    return {
        "Content-Security-Policy": csp,
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    }
