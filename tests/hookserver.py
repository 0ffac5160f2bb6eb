"""A real HTTP hook backend for the tests: an async Starlette app under uvicorn on a loopback
port, in a thread of the test process.

It verifies every request's signature on its own (HMAC-SHA256 over `timestamp.body`, as
the README tells a backend to) and answers 401 when it does not verify, so a roomcast
that signs wrongly fails closed. What it answers is decided by the request:

- connect: `{"user": {"id": "u-<username>", "name": <Username>}}`; `username=mallory` is
  refused 4403, `username=slow` answers after 3 s, `username=empty` answers `{}`;
- join: rooms `staff*` get `forbidden`; `slow*` answer after 3 s, `crash*` HTTP 500,
  `garbage*` a body that is not JSON, `odd*` JSON of another shape;
- chat: texts with `spam` get `forbidden`; others come back upper-cased.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

SLOW = 3.0  # seconds: over the HOOK_TIMEOUT of 1 s the tests use
MAX_AGE = 300  # seconds a signature stays acceptable (replays are refused after)


@dataclass
class Seen:
    hook: str
    body: dict[str, Any]
    headers: dict[str, str]
    client_port: int
    verified: bool


@dataclass
class HookServer:
    secret: str
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    def url(self, hook: str) -> str:
        return f"http://127.0.0.1:{self.port}/{hook}"

    def bodies(self, hook: str) -> list[dict[str, Any]]:
        return [s.body for s in self.seen if s.hook == hook]

    def verify(self, request_headers: dict[str, str], body: bytes) -> bool:
        timestamp = request_headers.get("roomcast-timestamp", "")
        given = request_headers.get("roomcast-signature", "")
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > MAX_AGE:
            return False
        expected = hmac.new(
            self.secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256
        ).hexdigest()
        return hmac.compare_digest(given, "sha256=" + expected)

    async def handle(self, request: Request) -> Response:
        hook = request.path_params["hook"]
        raw = await request.body()
        headers = dict(request.headers)
        verified = self.verify(headers, raw)
        body = json.loads(raw)
        client = request.client
        self.seen.append(Seen(hook, body, headers, client.port if client else 0, verified))
        if not verified or headers.get("roomcast-hook") != hook:
            return JSONResponse({"error": "bad signature"}, 401)
        answer: Callable[[dict[str, Any]], Awaitable[Response]] = getattr(self, hook)
        return await answer(body)

    async def connect(self, body: dict[str, Any]) -> Response:
        name = body["query"].get("username", "")
        if name == "mallory":
            return JSONResponse({"refuse": {"code": 4403, "detail": "Not you, mallory."}})
        if name == "slow":
            await asyncio.sleep(SLOW)
        if name == "empty":
            return JSONResponse({})  # neither `user` nor `refuse`
        return JSONResponse({"user": {"id": f"u-{name}", "name": name.title()}})

    async def join(self, body: dict[str, Any]) -> Response:
        room: str = body["room"]
        if room.startswith("staff"):
            detail = f"{body['user']['name']} may not join {room}."
            return JSONResponse({"error": {"code": "forbidden", "detail": detail}})
        if room.startswith("slow"):
            await asyncio.sleep(SLOW)
        if room.startswith("crash"):
            return PlainTextResponse("boom", 500)
        if room.startswith("garbage"):
            return PlainTextResponse("<html>not json</html>")
        if room.startswith("odd"):
            return JSONResponse({"error": "no"})
        return JSONResponse({})

    async def chat(self, body: dict[str, Any]) -> Response:
        if "spam" in body["text"]:
            return JSONResponse({"error": {"code": "forbidden", "detail": "No spam."}})
        return JSONResponse({"text": body["text"].upper()})

    def start(self) -> HookServer:
        app = Starlette(routes=[Route("/{hook}", self.handle, methods=["POST"])])
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self._server = server = uvicorn.Server(config)
        self._thread = threading.Thread(target=server.run, name="hook-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not server.started:  # polled: uvicorn sets a flag, it has no event to wait on
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the hook server did not start")
            time.sleep(0.01)
        self.port = server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
