"""Screenshots of the admin page for the README: docs/admin-1280.png and docs/admin-390.png.

    .venv/bin/python scripts/admin_screenshots.py     # about a minute

Starts `roomcast serve` with two workers on a Redis of its own, lets members join four
rooms and chat for a while (so the chart has something to show), then opens the admin
page in Debian's chromium at 1280 and 390 pixels wide, with the lobby's room view open.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from playwright.sync_api import sync_playwright  # noqa: E402
from websockets.sync.client import ClientConnection, connect  # noqa: E402
from websockets.typing import Subprotocol  # noqa: E402

from tests.brokers import start_redis  # noqa: E402
from tests.conftest import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from tests.servers import Server, start_server  # noqa: E402

KEY = "screenshot-key-0123456789"
PEOPLE = [
    ("ann", "lobby"),
    ("bob", "lobby"),
    ("chen", "team-ops"),
    ("dara", "lobby"),
    ("eli", "support"),
    ("fatima", "team-ops"),
    ("gus", "lobby"),
    ("hana", "random"),
    ("ivo", "support"),
    ("jo", "lobby"),
    ("kai", "team-ops"),
    ("lea", "lobby"),
]
LINES = [
    ("ann", "morning all"),
    ("bob", "deploy of v2 starts at 10:30"),
    ("dara", "<b>not bold</b>: user text is shown as text"),
    ("ann", "looks good to me"),
    ("gus", "the canary looks fine"),
]
TRAFFIC_SECONDS = 40


def member(server: Server, name: str, room: str) -> ClientConnection:
    query = urllib.parse.urlencode({"username": name, "client": f"shot-{name}"})
    ws = connect(
        f"{server.ws}/ws/{room}?{query}", subprotocols=[Subprotocol("roomcast.v1")]
    ).__enter__()

    def read() -> None:  # keep up, as a real client does
        try:
            while True:
                ws.recv()
        except Exception:
            return

    threading.Thread(target=read, daemon=True).start()
    return ws


def traffic(server: Server, stop: threading.Event) -> list[ClientConnection]:
    """Members arrive one every few seconds; the lobby chats in bursts."""
    sockets: dict[str, ClientConnection] = {}
    started = time.monotonic()
    tick = 0
    while not stop.is_set() and time.monotonic() - started < TRAFFIC_SECONDS:
        if tick % 3 == 0 and len(sockets) < len(PEOPLE):
            name, room = PEOPLE[len(sockets)]
            sockets[name] = member(server, name, room)
        if "ann" in sockets and (tick // 5) % 2 == 0:
            for _ in range(1 + tick % 4):
                text = json.dumps({"type": "chat", "room": "lobby", "text": f"tick {tick}"})
                sockets["ann"].send(text)
        tick += 1
        stop.wait(1.0)  # a steady pace, one step a second
    for name, text in LINES:
        sockets[name].send(json.dumps({"type": "chat", "room": "lobby", "text": text}))
    return list(sockets.values())


def publish(server: Server) -> None:
    body = {"type": "notification", "title": "Deploy", "body": "v2 is live", "level": "success"}
    request = urllib.request.Request(
        server.http + "/api/rooms/lobby/publish",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def shoot(server: Server, out: Path) -> None:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        for width in (1280, 390):
            context = browser.new_context(viewport={"width": width, "height": 800})
            page = context.new_page()
            page.goto(server.http + "/admin")
            page.fill("#key", KEY)
            page.click("#key-form button[type=submit]")
            page.locator('#room-rows tr[data-room="lobby"] button').click(timeout=15_000)
            page.locator("#history li").last.wait_for(timeout=15_000)
            page.locator("#state").get_by_text("live").wait_for(timeout=15_000)
            page.screenshot(path=str(out / f"admin-{width}.png"), full_page=True)
            context.close()
        browser.close()


def main() -> None:
    redis = start_redis()
    server = start_server(
        {
            "BROADCAST_URL": redis.url,
            "WEB_CONCURRENCY": "2",
            "API_KEY": KEY,
            "CONNECT_RATE": "100",
        }
    )
    stop = threading.Event()
    try:
        sockets = traffic(server, stop)
        publish(server)
        shoot(server, REPO / "docs")
        for ws in sockets:
            ws.close()
    finally:
        stop.set()
        server.terminate()
        redis.stop()
    print("wrote docs/admin-1280.png and docs/admin-390.png")


if __name__ == "__main__":
    main()
