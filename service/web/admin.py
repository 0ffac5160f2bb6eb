"""The admin page: the cluster's figures, its rooms, and actions on one room.

The page is static apart from the asset URLs: everything it shows comes from
the HTTP API (`/api/stats`, `/api/rooms`, a room's presence and history), read
with the API key the user types, which the page keeps in sessionStorage and
sends as a bearer token only. Every URL it uses is relative, so it works
wherever roomcast is mounted.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from ..settings import Settings
from .assets import Assets, page_headers


def admin_route(templates: Jinja2Templates, assets: Assets, settings: Settings) -> Route:
    async def admin(request: Request) -> Response:
        return templates.TemplateResponse(
            request,
            "admin.html",
            {"static": assets.url_for, "api": settings.api_key is not None},
            headers=page_headers(request),
        )

    return Route("/admin", admin, methods=["GET"])
