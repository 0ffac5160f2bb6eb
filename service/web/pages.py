"""HTTP routes that are not the API: the chat page, health, readiness, schemas, metrics."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.templating import Jinja2Templates

from ..engine.hub import Hub
from ..observe import metrics
from ..protocol import asyncapi, typescript
from ..settings import Settings
from .admin import admin_route
from .assets import Assets, page_headers


def templates_dir() -> Path:
    """roomcast's Jinja templates: the package data `roomcast.templates` (the checkout's
    templates/ in an editable install, the copy inside the wheel otherwise)."""
    package = __name__.partition(".")[0] + ".templates"
    folder = Path(str(files(package)))
    if not (folder / "index.html").is_file():
        raise RuntimeError(f"roomcast's templates are missing (looked in {folder})")
    return folder


def page_routes(
    hub: Hub, settings: Settings, schema_document: dict[str, object]
) -> list[BaseRoute]:
    templates = Jinja2Templates(directory=templates_dir())
    assets = Assets(templates_dir() / "static")
    assets.add("roomcast.d.ts", typescript.declarations(schema_document).encode())
    asyncapi_document = asyncapi.document(schema_document)

    async def index(request: Request) -> Response:
        return templates.TemplateResponse(
            request,
            "index.html",
            {
                "max_text_chars": settings.max_text_chars,
                "max_name_chars": settings.max_name_chars,
                # JWT_SECRET mode: the page asks for a token instead of a display name.
                "auth": settings.jwt_secret is not None,
                "asset": assets.url_for,
            },
            headers=page_headers(request),
        )

    async def healthz(request: Request) -> Response:
        # Public: it says the process serves, nothing about who uses it (see /metrics).
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        ready = hub.ready
        return JSONResponse(
            {"status": "ready" if ready else "unavailable", "broadcast": ready},
            status_code=200 if ready else 503,
        )

    async def schema_json(request: Request) -> Response:
        return JSONResponse(schema_document)

    async def asyncapi_json(request: Request) -> Response:
        return JSONResponse(asyncapi_document)

    async def static(request: Request) -> Response:
        return assets.response(request, request.path_params["name"])

    async def client_module(request: Request) -> Response:
        return assets.response(request, "roomcast.js")

    async def client_types(request: Request) -> Response:
        return assets.response(request, "roomcast.d.ts")

    async def prometheus(request: Request) -> Response:
        # In a thread: with several workers, the exposition reads their files.
        body, content_type = await run_in_threadpool(
            metrics.exposition, request.headers.get("accept")
        )
        return Response(body, media_type=content_type)

    return [
        Route("/", index, methods=["GET"]),
        admin_route(templates, assets, settings),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/schema.json", schema_json, methods=["GET"]),
        Route("/asyncapi.json", asyncapi_json, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/static/{name}", static, methods=["GET"]),
        Route("/roomcast.js", client_module, methods=["GET"]),
        Route("/roomcast.d.ts", client_types, methods=["GET"]),
    ]
