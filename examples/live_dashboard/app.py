"""A live dashboard: a background task publishes this server's metrics into the room
`metrics` every second, and the page draws them as a live chart over the WebSocket.

    uvicorn examples.live_dashboard.app:app          # then open http://127.0.0.1:8000/

Each sample is a stored notification (it gets the room's next offset), so a viewer that
reconnects joins with `since` its last offset and the chart has no gap.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from roomcast import Roomcast, Settings

ROOM = "metrics"
STATIC = Path(__file__).resolve().parent / "static"
log = logging.getLogger("examples.live_dashboard")

Sampler = Callable[[Roomcast], dict[str, Any]]


def sample(rc: Roomcast) -> dict[str, Any]:
    """What the chart shows: the load average, this process's peak memory, the viewers."""
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "load": round(os.getloadavg()[0], 2),
        "memory_mb": round(peak_kib / 1024, 1),
        "viewers": rc.hub.stats().connections,
    }


async def publish_metrics(rc: Roomcast, interval: float, sampler: Sampler = sample) -> None:
    """Every `interval` seconds, one stored notification with the sample in `data`."""
    while True:
        try:
            await rc.publish(ROOM, title="metrics", body="", data=sampler(rc))
        except Exception as exc:  # the broker is away: the next sample tries again
            log.warning("metrics not published: %r", exc)
        await asyncio.sleep(interval)


def page_headers(request: Request) -> dict[str, str]:
    """A strict policy: scripts and styles from this origin only, nothing inline."""
    host = request.headers.get("host", "")
    policy = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        f"connect-src 'self' ws://{host} wss://{host}; base-uri 'none'; "
        "frame-ancestors 'none'; object-src 'none'"
    )
    return {"Content-Security-Policy": policy, "Cache-Control": "no-store"}


def create_app(
    settings: Settings | None = None, interval: float | None = None, sampler: Sampler = sample
) -> Starlette:
    rc = Roomcast(settings)
    every = interval if interval is not None else float(os.environ.get("DASHBOARD_INTERVAL", "1"))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with rc.lifespan():
            publisher = asyncio.create_task(publish_metrics(rc, every, sampler))
            try:
                yield
            finally:
                publisher.cancel()
                await asyncio.gather(publisher, return_exceptions=True)

    async def page(request: Request) -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=page_headers(request))

    app = Starlette(
        routes=[
            Route("/", page),
            Mount("/static", StaticFiles(directory=STATIC)),
            Mount("/rt", app=rc),
        ],
        lifespan=lifespan,
    )
    app.state.roomcast = rc
    return app


app = create_app()
