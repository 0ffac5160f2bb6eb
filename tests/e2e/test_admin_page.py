"""The admin page, for real: Debian chromium driven by Playwright against `roomcast serve`
with two workers on Redis (the figures are both workers'), and mounted in an app.

Every page gets its own browser context. Waits are Playwright's auto-waiting
`expect`, or polling under a deadline; nothing sleeps. Every page is checked
for JavaScript errors, console errors (a CSP violation is one) and for the API
key in any URL it requested.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Dialog,
    Page,
    Request,
    expect,
)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

from ..brokers import start_redis
from ..servers import Server, start_app, start_server
from ..support import http

pytestmark = pytest.mark.slow

KEY = "admin-key-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {KEY}"}
WAIT = 15_000  # ms: generous, for a loaded 2-core machine (the page refreshes every 2 s)
EVIL = "<img src=x onerror=alert(1)>"
TILES = (
    "connections",
    "rooms",
    "users",
    "messages_in_per_s",
    "deliveries_per_s",
    "slow_consumers_total",
    "broker",
    "history",
    "workers",
)
# What Chromium logs for every answer with an error status, fetch() included.
FAILED_LOAD = re.compile(r"^Failed to load resource: the server responded with a status of")


@dataclass
class Admin:
    """One admin page in its own browser context, and what it did."""

    context: BrowserContext
    page: Page
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def open(self, server: Server, key: str = KEY) -> Admin:
        self.page.goto(server.http + "/admin")
        self.page.fill("#key", key)
        self.page.click("#key-form button[type=submit]")
        return self

    def live(self) -> Admin:
        expect(self.page.locator("#state")).to_have_text("live", timeout=WAIT)
        return self

    def tiles(self) -> dict[str, str]:
        return {name: self.page.locator(f"#stat-{name}").inner_text() for name in TILES}

    def open_room(self, room: str) -> None:
        page = self.page
        page.fill("#filter", room)
        row = page.locator(f'#room-rows tr[data-room="{room}"] button')
        expect(row).to_have_count(1, timeout=WAIT)
        row.click()
        expect(page.locator("#room-name")).to_have_text(room)


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[Server]:
    """Two workers sharing Redis, with the API on."""
    env = {
        "BROADCAST_URL": f"{request.getfixturevalue('redis_url')}?prefix=a{uuid.uuid4().hex[:8]}",
        "WEB_CONCURRENCY": "2",
        "API_KEY": KEY,
        "RATE_LIMIT": "1000",
        "CONNECT_RATE": "1000",
    }
    srv = start_server(env)
    # start_server returns once one worker serves; wait for the other (bounded).
    deadline = time.monotonic() + 30
    while api_stats(srv)["workers"] != 2:
        assert time.monotonic() < deadline, "the second worker never answered"
        time.sleep(0.1)  # polling interval, bounded by the deadline
    yield srv
    srv.terminate()


@pytest.fixture
def new_admin(browser: Browser) -> Iterator[Callable[..., Admin]]:
    admins: list[tuple[Admin, re.Pattern[str] | None]] = []

    def make(width: int = 1280, console_allows: re.Pattern[str] | None = None) -> Admin:
        context = browser.new_context(viewport={"width": width, "height": 900})
        context.set_default_timeout(WAIT)
        admin = Admin(context, context.new_page())

        def on_dialog(dialog: Dialog) -> None:
            admin.dialogs.append(dialog.message)
            # Only the page's own confirmation is accepted; anything else is a finding.
            if dialog.type == "confirm" and dialog.message.startswith("Disconnect "):
                dialog.accept()
            else:
                dialog.dismiss()

        admin.page.on("dialog", on_dialog)
        admin.page.on("pageerror", lambda exc: admin.errors.append(str(exc)))
        admin.page.on(
            "console", lambda msg: admin.console.append(msg.text) if msg.type == "error" else None
        )
        admin.page.on("request", lambda sent: admin.requests.append(sent))
        admins.append((admin, console_allows))
        return admin

    yield make
    for admin, _ in admins:
        admin.context.close()
    for admin, allows in admins:
        assert admin.errors == [], f"JavaScript errors on the page: {admin.errors}"
        unexpected = [m for m in admin.console if allows is None or not allows.search(m)]
        assert unexpected == [], f"console errors (a CSP violation is one): {unexpected}"
        for sent in admin.requests:
            assert KEY not in urllib.parse.unquote(sent.url), f"the key in a URL: {sent.url}"


class Member:
    """A WebSocket client of a room (the websockets library, blocking)."""

    def __init__(self, server: Server, room: str, name: str) -> None:
        query = urllib.parse.urlencode({"username": name, "client": uuid.uuid4().hex})
        self.ws: ClientConnection = connect(
            f"{server.ws}/ws/{room}?{query}",
            subprotocols=[Subprotocol("roomcast.v1")],
            open_timeout=10,
        ).__enter__()  # closed by close()
        self.user = self.next("welcome")["user"]
        self.joined = self.next("joined")

    def next(self, kind: str, within: float = 15) -> dict[str, Any]:
        """The next frame of `kind`, skipping others (presence events, acks)."""
        deadline = time.monotonic() + within
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind} frame within {within}s")
            frame = json.loads(self.ws.recv(timeout=left))
            if frame["type"] == kind:
                return frame  # type: ignore[no-any-return]

    def say(self, room: str, text: str) -> int:
        ref = uuid.uuid4().hex
        self.ws.send(json.dumps({"type": "chat", "room": room, "text": text, "ref": ref}))
        return int(self.next("ack")["offset"])

    def closed_with(self, within: float = 15) -> tuple[int, list[dict[str, Any]]]:
        frames: list[dict[str, Any]] = []
        deadline = time.monotonic() + within
        while True:
            try:
                frames.append(json.loads(self.ws.recv(timeout=deadline - time.monotonic())))
            except ConnectionClosed as exc:
                assert exc.rcvd is not None, f"closed without a close frame: {exc!r}"
                return exc.rcvd.code, frames
            except TimeoutError:
                raise AssertionError(f"not closed within {within}s; got {frames}") from None

    def close(self) -> None:
        self.ws.close()


def fresh_room() -> str:
    return "adm-" + uuid.uuid4().hex[:10]


def api_stats(server: Server) -> dict[str, Any]:
    status, found = http(server, "GET", "/api/stats", None, AUTH)
    assert status == 200, found
    return found  # type: ignore[no-any-return]


# --- the key ------------------------------------------------------------------------


def test_wrong_key_shows_the_error(cluster: Server, new_admin: Callable[..., Admin]) -> None:
    admin = new_admin(console_allows=FAILED_LOAD).open(cluster, "not-the-key-" + "x" * 20)
    page = admin.page
    expect(page.locator("#error")).to_contain_text("Wrong API key", timeout=WAIT)
    expect(page.locator("#key-form")).to_be_visible()
    expect(page.locator("#dashboard")).to_be_hidden()
    assert page.evaluate("sessionStorage.length") == 0, "a refused key was kept"
    asked = [r for r in admin.requests if "/api/" in r.url]
    assert asked and all(
        r.headers.get("authorization") == "Bearer not-the-key-" + "x" * 20 for r in asked
    )
    # Every console error is the browser's line about the 401.
    assert all(FAILED_LOAD.search(m) and "401" in m for m in admin.console), admin.console


def test_api_off_is_said_in_words(server: Server, new_admin: Callable[..., Admin]) -> None:
    admin = new_admin()
    admin.page.goto(server.http + "/admin")  # the session's server: no API_KEY
    expect(admin.page.locator("#error")).to_contain_text("The HTTP API is off", timeout=WAIT)
    expect(admin.page.locator("#key-form")).to_be_hidden()


# --- the figures --------------------------------------------------------------------


def test_right_key_shows_tiles_that_match_api_stats(
    cluster: Server, new_admin: Callable[..., Admin]
) -> None:
    lobby, team = fresh_room(), fresh_room()
    members = [Member(cluster, lobby, "ann"), Member(cluster, lobby, "bob")]
    members.append(Member(cluster, team, "cy"))
    try:
        admin = new_admin().open(cluster).live()
        # Both sides change every second (rates): poll until they agree (bounded).
        deadline = time.monotonic() + WAIT / 1000
        while True:
            expected, shown = api_stats(cluster), admin.tiles()
            if set(expected) == set(TILES) and all(
                shown[name] == value if isinstance(value, str) else float(shown[name]) == value
                for name, value in expected.items()
            ):
                break
            assert time.monotonic() < deadline, f"tiles {shown} never matched {expected}"
            admin.page.wait_for_timeout(200)  # polling interval, bounded by the deadline
        assert shown["workers"] == "2" and int(shown["connections"]) >= 3, shown
        assert (shown["broker"], shown["history"]) == ("connected", "connected")
        # The chart: 300 seconds of each series.
        for line in ("connections", "deliveries"):
            points = admin.page.get_attribute(f"#line-{line}", "points") or ""
            assert len(points.split()) == 300, line
        # The key is kept for the tab only, and sent only as the bearer token.
        assert admin.page.evaluate("sessionStorage.getItem('roomcast.admin.key')") == KEY
        assert admin.page.evaluate("localStorage.length") == 0
        asked = [r for r in admin.requests if "/api/" in r.url]
        assert asked and all(r.headers.get("authorization") == f"Bearer {KEY}" for r in asked)
        # Forgetting the key locks the page again.
        admin.page.click("#forget")
        expect(admin.page.locator("#key-form")).to_be_visible()
        assert admin.page.evaluate("sessionStorage.length") == 0
    finally:
        for member in members:
            member.close()


# --- one room -------------------------------------------------------------------------


def test_room_view_lists_online_users_and_history_as_text(
    cluster: Server, new_admin: Callable[..., Admin]
) -> None:
    room = fresh_room()
    ann, evil = Member(cluster, room, "ann"), Member(cluster, room, EVIL)
    try:
        evil.say(room, EVIL)
        ann.say(room, "hello <b>there</b>")
        admin = new_admin(width=390).open(cluster).live()
        admin.open_room(room)
        page = admin.page
        expect(page.locator("#room-online")).to_have_text("2", timeout=WAIT)
        expect(page.locator("#users li .who")).to_have_count(2)
        ids = page.locator("#users li").evaluate_all("els => els.map(e => e.dataset.userId)")
        assert sorted(ids) == sorted([ann.user["id"], evil.user["id"]])
        expect(page.locator("#history li .text")).to_have_text(
            [EVIL, "hello <b>there</b>"], timeout=WAIT
        )
        expect(page.locator("#history li .who").first).to_contain_text(EVIL)
        assert page.locator("#history li .text").first.inner_html() == (
            "&lt;img src=x onerror=alert(1)&gt;"
        )
        assert page.evaluate("document.querySelectorAll('img, b').length") == 0
        assert admin.dialogs == []
        # It fits a 390 px screen: nothing wider than the viewport.
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
    finally:
        ann.close()
        evil.close()


def test_publishing_from_the_form_reaches_a_connected_client(
    cluster: Server, new_admin: Callable[..., Admin]
) -> None:
    room = fresh_room()
    member = Member(cluster, room, "dee")
    try:
        admin = new_admin().open(cluster).live()
        admin.open_room(room)
        page = admin.page
        page.fill("#publish-title", "Deploy")
        page.fill("#publish-body", "v2 is live")
        page.select_option("#publish-level", "success")
        page.click("#publish button[type=submit]")
        got = member.next("notification")
        assert (got["room"], got["title"], got["body"], got["level"]) == (
            room,
            "Deploy",
            "v2 is live",
            "success",
        )
        expect(page.locator("#room-result")).to_have_text(f"Published in {room} as #1.")
        expect(page.locator("#history li .text")).to_have_text(["v2 is live"], timeout=WAIT)
    finally:
        member.close()


def test_disconnecting_a_user_closes_their_socket_with_4401(
    cluster: Server, new_admin: Callable[..., Admin]
) -> None:
    room = fresh_room()
    stays, goes = Member(cluster, room, "stays"), Member(cluster, room, "goes")
    try:
        admin = new_admin().open(cluster).live()
        admin.open_room(room)
        page = admin.page
        user = page.locator(f'#users li[data-user-id="{goes.user["id"]}"]')
        expect(user).to_have_count(1, timeout=WAIT)
        user.locator("button").click()
        code, frames = goes.closed_with()
        assert code == 4401
        assert [f["code"] for f in frames if f["type"] == "error"] == ["unauthorized"]
        assert len(admin.dialogs) == 1 and goes.user["id"] in admin.dialogs[0]
        expect(page.locator("#room-result")).to_have_text("Disconnected 1 connection(s) of goes.")
        expect(page.locator("#users li")).to_have_count(1, timeout=WAIT)
        stays.ws.send(json.dumps({"type": "ping", "ref": "alive"}))
        assert stays.next("pong")["ref"] == "alive"
    finally:
        stays.close()
        goes.close()


# --- failures and mounting ---------------------------------------------------------------


def test_a_broker_outage_is_said_in_words(new_admin: Callable[..., Admin]) -> None:
    redis = start_redis()
    server = start_server({"BROADCAST_URL": redis.url, "API_KEY": KEY})
    member = Member(server, fresh_room(), "eve")
    try:
        admin = new_admin(console_allows=FAILED_LOAD).open(server).live()
        redis.stop(keep_data=True)
        page = admin.page
        expect(page.locator("#stat-broker")).to_have_text("reconnecting", timeout=WAIT)
        expect(page.locator("#warning")).to_contain_text("The broker is reconnecting")
        expect(page.locator("#warning")).to_contain_text("The history store does not answer")
        # The room list needs presence, which lives in Redis too.
        expect(page.locator("#rooms-error")).to_contain_text("did not answer", timeout=WAIT)
        expect(page.locator("#state")).to_have_text("degraded")
        assert all("503" in m for m in admin.console), admin.console
    finally:
        member.close()
        server.terminate()
        redis.stop()


def test_the_page_works_mounted_under_a_prefix(new_admin: Callable[..., Admin]) -> None:
    server = start_app("tests.hostapp:app", "/rt", {"API_KEY": KEY})
    member = Member(server, fresh_room(), "fay")
    try:
        admin = new_admin().open(server).live()
        expect(admin.page.locator("#stat-connections")).to_have_text("1", timeout=WAIT)
        paths = {urllib.parse.urlsplit(r.url).path for r in admin.requests}
        assert "/rt/api/stats" in paths and "/rt/static/admin.js" in paths, paths
    finally:
        member.close()
        server.terminate()
