"""Static assets: a strong ETag from their content, 304 on revalidation, a year of caching
only for a URL that names the content's version."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from roomcast.web.assets import IMMUTABLE, REVALIDATE, Assets


def app_serving(folder: Path) -> tuple[Starlette, Assets]:
    assets = Assets(folder)

    async def static(request: Request) -> Response:
        return assets.response(request, request.path_params["name"])

    return Starlette(routes=[Route("/static/{name}", static)]), assets


def test_assets_revalidate_by_etag_and_cache_versioned_urls(tmp_path: Path) -> None:
    (tmp_path / "app.js").write_text("export const x = 1;\n")
    (tmp_path / ".hidden").write_text("secret")
    app, assets = app_serving(tmp_path)
    with TestClient(app) as http:
        plain = http.get("/static/app.js")
        assert plain.status_code == 200 and plain.text == "export const x = 1;\n"
        assert plain.headers["content-type"] == "text/javascript; charset=utf-8"
        assert plain.headers["cache-control"] == REVALIDATE
        assert plain.headers["x-content-type-options"] == "nosniff"
        etag = plain.headers["etag"]
        again = http.get("/static/app.js", headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
        versioned = http.get("/" + assets.url_for("app.js"))
        assert versioned.headers["cache-control"] == IMMUTABLE
        assert http.get("/static/app.js?v=stale").headers["cache-control"] == REVALIDATE
        assert http.get("/static/.hidden").status_code == 404
        assert http.get("/static/missing.js").status_code == 404


def test_a_changed_asset_gets_another_etag_and_version(tmp_path: Path) -> None:
    (tmp_path / "a.css").write_text("a{}")
    first = Assets(tmp_path)
    (tmp_path / "a.css").write_text("b{}")
    second = Assets(tmp_path)
    assert first.files["a.css"].etag != second.files["a.css"].etag
    assert first.url_for("a.css") != second.url_for("a.css")
