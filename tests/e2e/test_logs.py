"""Structured logs: JSON lines from a real server, with no token, key or message text."""

from __future__ import annotations

import json
import uuid

from roomcast.web.auth import mint_token

from ..servers import start_server
from ..support import client, room_client
from .test_api import api
from .test_cli import roomcast

SECRET = "log-secret-" + uuid.uuid4().hex
KEY = "log-key-" + uuid.uuid4().hex


async def test_json_logs_carry_fields_and_no_secrets() -> None:
    server = start_server(
        {
            "LOG_FORMAT": "json",
            "JWT_SECRET": SECRET,
            "API_KEY": KEY,
            "PYTHONUNBUFFERED": "1",
        }
    )
    token = mint_token(SECRET, "ann", name="Ann", rooms=["*"], ttl=600)
    text = "private words " + uuid.uuid4().hex
    title = "private title " + uuid.uuid4().hex
    try:
        async with room_client(server, "lobby", token=token) as ann:
            await ann.chat(text)
            headers = {"Authorization": f"Bearer {KEY}"}
            await api(server, "POST", "/api/rooms/lobby/publish", {
                "type": "notification", "title": title, "body": text}, headers=headers)  # fmt: skip
            await ann.recv_type("notification", title=title)
        async with client(server, token="not-a-token", welcome=False) as refused:
            await refused.expect_close(4401)
    finally:
        server.terminate()
    log = server.log()
    for secret in (token, KEY, SECRET, text, title):
        assert secret not in log, f"{secret[:12]}… reached the log"
    entries = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in entries), entries
    assert all(e["ts"].endswith("Z") for e in entries)
    publish = [e for e in entries if e.get("path", "").startswith("/api/rooms/lobby/publish")]
    assert publish and publish[0]["method"] == "POST" and publish[0]["status"] == 200, entries
    handshakes = [e["msg"] for e in entries if "/ws/lobby" in e["msg"]]
    assert handshakes and all("token=[redacted]" in m for m in handshakes), handshakes


def test_a_bad_log_format_stops_start_up() -> None:
    run = roomcast("serve", "--port", "0", LOG_FORMAT="xml")
    assert run.returncode == 2, run
    assert "LOG_FORMAT='xml' is invalid" in run.stderr and "json" in run.stderr


async def test_log_format_option_wins_over_the_variable() -> None:
    server = start_server({"LOG_FORMAT": "json"}, args=["--log-format", "text"])
    try:
        async with client(server) as c:
            await c.ping()
    finally:
        server.terminate()
    first = server.log().splitlines()[0]
    assert first.startswith("INFO:") and not first.startswith("{"), first
