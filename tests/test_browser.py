"""The chat page, for real: Debian chromium driven by Playwright against `roomcast serve`.

Every page gets its own browser context (its own localStorage, so its own
`client` id). Waits are Playwright's auto-waiting `expect` with explicit
timeouts; nothing sleeps.
"""

from __future__ import annotations

import json
import os
import re
import time
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
    WebSocket,
    WebSocketRoute,
    expect,
    sync_playwright,
)

from .servers import Server, start_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT = 10_000  # ms: generous, for a loaded 2-core machine
RECONNECT_WAIT = 20_000  # ms: backoff grows while offline
WS_URL = re.compile(r"/ws\?")
RECOVERY_NOTICE = "Some messages could not be recovered; reloading recent history"
EVIL_NAME = "<img src=x onerror=alert(1)>"


@dataclass
class Chat:
    """One chat page in its own browser context, and what it did that a test may check."""

    context: BrowserContext
    page: Page
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)  # of every WebSocket the page opened

    def join(self, server: Server, name: str, room: str) -> Chat:
        page = self.page
        page.goto(server.http + "/")
        page.fill("#name", name)
        page.fill("#room", room)
        page.click("#connect")
        expect(page.locator("#status")).to_contain_text("online", timeout=WAIT)
        return self

    def say(self, text: str) -> None:
        self.page.fill("#text", text)
        self.page.press("#text", "Enter")
        expect(self.page.locator("#text")).to_have_value("", timeout=WAIT)

    @property
    def client_id(self) -> str:
        value = self.page.evaluate("localStorage.getItem('roomcast.client')")
        assert isinstance(value, str) and value
        return value

    def texts(self) -> list[str]:
        return self.page.locator("#messages .msg .text").all_text_contents()

    def offsets(self) -> list[int]:
        values = self.page.locator("#messages .msg").evaluate_all(
            "els => els.map(e => e.dataset.offset)"
        )
        return [int(v) for v in values]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium (`apt-get install -y chromium`); "
            "never `playwright install`.",
            pytrace=False,
        )
    with sync_playwright() as pw:
        launched = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=60_000
        )
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def web() -> Iterator[Server]:
    srv = start_server()
    yield srv
    srv.terminate()


@pytest.fixture
def new_chat(browser: Browser) -> Iterator[Callable[[], Chat]]:
    chats: list[Chat] = []

    def make() -> Chat:
        context = browser.new_context()
        context.set_default_timeout(WAIT)
        chat = Chat(context, context.new_page())

        def on_dialog(dialog: Dialog) -> None:
            chat.dialogs.append(dialog.message)
            dialog.dismiss()

        def on_socket(ws: WebSocket) -> None:
            chat.urls.append(ws.url)
            ws.on("framesent", lambda data: chat.sent.append(_frame(data)))
            ws.on("framereceived", lambda data: chat.received.append(_frame(data)))

        chat.page.on("dialog", on_dialog)
        chat.page.on("pageerror", lambda exc: chat.errors.append(str(exc)))
        chat.page.on("websocket", on_socket)
        chats.append(chat)
        return chat

    yield make
    for chat in chats:
        chat.context.close()
    for chat in chats:
        assert chat.errors == [], f"JavaScript errors on the page: {chat.errors}"


def _frame(data: str | bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        return {"type": "<not json>", "raw": data}
    return value if isinstance(value, dict) else {"type": "<not an object>", "raw": value}


def _room() -> str:
    return "t-" + uuid.uuid4().hex[:10]


def _cut_off(chat: Chat) -> None:
    """Network loss: new connections fail, and the open socket goes away."""
    chat.context.set_offline(True)
    chat.page.evaluate("window.roomcast.socket.close(4408)")
    expect(chat.page.locator("#status")).to_contain_text("reconnecting", timeout=WAIT)


def test_two_users_see_each_other_and_chat(web: Server, new_chat: Callable[[], Chat]) -> None:
    room = _room()
    alice = new_chat().join(web, "alice", room)
    bob = new_chat().join(web, "bob", room)

    # Each sees both, itself first; alice learnt of bob from a `system` join.
    for me, other, names in ((alice, bob, ["alice", "bob"]), (bob, alice, ["bob", "alice"])):
        expect(me.page.locator("#online li")).to_have_text(names, timeout=WAIT)
        expect(me.page.locator("#online-count")).to_have_text("2", timeout=WAIT)
        expect(me.page.locator(f'#online li[data-user-id="{other.client_id}"]')).to_have_count(1)
        expect(me.page.locator(f'#online li.me[data-user-id="{me.client_id}"]')).to_have_count(1)
    expect(alice.page.locator("#messages .system")).to_have_text(["bob joined"], timeout=WAIT)

    alice.say("hello from alice")
    for chat in (alice, bob):
        expect(chat.page.locator("#messages .msg .text")).to_have_text(
            ["hello from alice"], timeout=WAIT
        )
    bob.say("hi alice, bob here")
    for chat in (alice, bob):
        # Exactly once each, in order, with the offsets the server gave them.
        expect(chat.page.locator("#messages .msg .text")).to_have_text(
            ["hello from alice", "hi alice, bob here"], timeout=WAIT
        )
        expect(chat.page.locator("#messages .msg .who")).to_have_text(["alice", "bob"])
        assert chat.offsets() == [1, 2]
        expect(chat.page.locator("#pending > *")).to_have_count(0, timeout=WAIT)
    expect(alice.page.locator("#messages .msg.mine .text")).to_have_text(["hello from alice"])
    expect(bob.page.locator("#messages .msg.mine .text")).to_have_text(["hi alice, bob here"])

    # Every chat went out with a fresh ref, as a join'd member of the room.
    chats = [f for f in alice.sent + bob.sent if f.get("type") == "chat"]
    assert [f["room"] for f in chats] == [room, room]
    assert len({f["ref"] for f in chats}) == 2


def test_user_text_is_rendered_as_text(web: Server, new_chat: Callable[[], Chat]) -> None:
    room = _room()
    bob = new_chat().join(web, "bob", room)
    evil = new_chat().join(web, EVIL_NAME, room)
    evil.say("<b>bold</b>")

    for chat in (bob, evil):
        page = chat.page
        expect(page.locator("#messages .msg")).to_have_count(1, timeout=WAIT)
        expect(page.locator("#messages .msg .who")).to_have_text([EVIL_NAME])
        expect(page.locator("#messages .msg .text")).to_have_text(["<b>bold</b>"])
        expect(page.locator("#online li", has_text=EVIL_NAME)).to_have_count(1, timeout=WAIT)
        assert page.locator("#online li", has_text=EVIL_NAME).text_content() == EVIL_NAME
        assert page.locator("#messages img, #messages b, #online img").count() == 0
        assert page.evaluate("document.querySelectorAll('img').length") == 0
    # bob heard evil join: that line carries the name as text too.
    expect(bob.page.locator("#messages .system")).to_have_text([f"{EVIL_NAME} joined"])
    assert bob.page.locator("#messages .msg .text").inner_html() == "&lt;b&gt;bold&lt;/b&gt;"
    assert bob.dialogs == [] and evil.dialogs == []


def test_reconnects_and_recovers_missed_messages(web: Server, new_chat: Callable[[], Chat]) -> None:
    room = _room()
    alice = new_chat().join(web, "alice", room)
    bob = new_chat().join(web, "bob", room)
    alice.say("before")
    expect(alice.page.locator("#messages .msg .text")).to_have_text(["before"], timeout=WAIT)

    _cut_off(alice)
    # The server let alice go: bob sees her leave.
    expect(bob.page.locator("#online-count")).to_have_text("1", timeout=WAIT)
    for i in range(3):
        bob.say(f"missed {i}")
    expect(bob.page.locator("#messages .msg")).to_have_count(4, timeout=WAIT)
    assert alice.texts() == ["before"]

    alice.context.set_offline(False)  # alice reconnects by herself
    expect(alice.page.locator("#status")).to_contain_text("online", timeout=RECONNECT_WAIT)
    expect(alice.page.locator("#messages .msg .text")).to_have_text(
        ["before", "missed 0", "missed 1", "missed 2"], timeout=WAIT
    )
    offsets = alice.offsets()
    assert offsets == list(range(offsets[0], offsets[0] + 4)), offsets
    expect(alice.page.locator("#notice")).not_to_contain_text("could not be recovered")
    expect(bob.page.locator("#online-count")).to_have_text("2", timeout=WAIT)

    # It was a recovery, not a reload: the rejoin asked `since` the last offset seen.
    joins = [f for f in alice.sent if f.get("type") == "join"]
    assert len(joins) == 2, joins
    assert "history" in joins[0] and "since" not in joins[0]
    assert joins[1]["since"]["offset"] == offsets[0]
    joined = [f for f in alice.received if f.get("type") == "joined"]
    assert [f["recovered"] for f in joined] == [False, True]
    assert len(alice.urls) >= 2
    assert all(f"/ws?client={alice.client_id}&username=alice" in url for url in alice.urls)


def test_unrecoverable_gap_reloads_recent_history(new_chat: Callable[[], Chat]) -> None:
    small = start_server({"HISTORY_SIZE": "4", "OUTBOX_SIZE": "3"})
    try:
        room = _room()
        alice = new_chat().join(small, "alice", room)
        bob = new_chat().join(small, "bob", room)
        bob.say("seen")
        expect(alice.page.locator("#messages .msg .text")).to_have_text(["seen"], timeout=WAIT)

        _cut_off(alice)
        expect(bob.page.locator("#online-count")).to_have_text("1", timeout=WAIT)
        for i in range(6):  # offsets 2..7; the room retains 4..7
            bob.say(f"later {i}")
            expect(bob.page.locator("#messages .msg")).to_have_count(2 + i, timeout=WAIT)

        alice.context.set_offline(False)
        expect(alice.page.locator("#notice")).to_contain_text(
            RECOVERY_NOTICE, timeout=RECONNECT_WAIT
        )
        expect(alice.page.locator("#status")).to_contain_text("online", timeout=WAIT)
        # The old list is gone; what the room still retains is shown, once each.
        expect(alice.page.locator("#messages .msg .text")).to_have_text(
            ["later 2", "later 3", "later 4", "later 5"], timeout=WAIT
        )
        assert alice.offsets() == [4, 5, 6, 7]
        expect(alice.page.locator("#messages .system")).to_contain_text([RECOVERY_NOTICE])

        # Live chat still flows both ways after the reload.
        alice.say("back")
        for chat in (alice, bob):
            expect(chat.page.locator("#messages .msg .text").last).to_have_text(
                "back", timeout=WAIT
            )
        assert alice.offsets() == [4, 5, 6, 7, 8]
    finally:
        small.terminate()


def test_client_id_survives_a_reload(web: Server, new_chat: Callable[[], Chat]) -> None:
    room = _room()
    alice = new_chat().join(web, "alice", room)
    bob = new_chat().join(web, "bob", room)
    me = alice.page.locator("#online li.me")
    expect(me).to_have_count(1, timeout=WAIT)
    before = me.get_attribute("data-user-id")
    assert before == alice.client_id

    alice.page.reload()
    # Name and room were kept; the page reconnects by itself with the same client id.
    expect(alice.page.locator("#status")).to_contain_text("online", timeout=WAIT)
    expect(alice.page.locator("#name")).to_have_value("alice")
    expect(alice.page.locator("#room")).to_have_value(room)
    expect(me).to_have_attribute("data-user-id", before, timeout=WAIT)
    for chat in (alice, bob):
        expect(chat.page.locator("#online li")).to_have_count(2, timeout=WAIT)
        expect(chat.page.locator("#online-count")).to_have_text("2", timeout=WAIT)
    expect(bob.page.locator(f'#online li[data-user-id="{before}"]')).to_have_text("alice")
    assert len(alice.urls) == 2
    assert all(f"client={before}&" in url for url in alice.urls)


def test_invalid_room_is_refused_in_the_page(web: Server, new_chat: Callable[[], Chat]) -> None:
    chat = new_chat()
    page = chat.page
    page.goto(web.http + "/")
    expect(page.locator("#room")).to_have_value("lobby")
    page.fill("#room", "no spaces allowed")
    page.click("#connect")
    expect(page.locator("#notice")).to_contain_text("Room names are 1 to 64", timeout=WAIT)
    expect(page.locator("#room")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#status")).to_have_attribute("data-state", "idle")
    assert chat.urls == []


def test_duplicate_frames_are_shown_once(web: Server, new_chat: Callable[[], Chat]) -> None:
    """Between the server and alice's page, every chat is delivered twice and
    every earlier one again after it: the page still shows each offset once, in order."""
    room = _room()
    alice = new_chat()
    earlier: list[str] = []

    def meddle(page_side: WebSocketRoute) -> None:
        server_side = page_side.connect_to_server()

        def relay(message: str | bytes) -> None:
            page_side.send(message)
            if isinstance(message, str) and _frame(message).get("type") == "chat":
                page_side.send(message)
                for old in earlier:
                    page_side.send(old)
                earlier.append(message)

        server_side.on_message(relay)

    alice.page.route_web_socket(WS_URL, meddle)
    alice.join(web, "alice", room)
    bob = new_chat().join(web, "bob", room)
    for i in range(3):
        bob.say(f"once {i}")
        expect(bob.page.locator("#messages .msg")).to_have_count(i + 1, timeout=WAIT)
    alice.say("mine once")
    expected = ["once 0", "once 1", "once 2", "mine once"]
    expect(bob.page.locator("#messages .msg .text")).to_have_text(expected, timeout=WAIT)
    expect(alice.page.locator("#messages .msg .text")).to_have_text(expected, timeout=WAIT)
    assert len(earlier) == 4
    assert alice.offsets() == [1, 2, 3, 4]


def test_heartbeat_ping_and_reconnect_on_silence(web: Server, new_chat: Callable[[], Chat]) -> None:
    """A mock server with heartbeat 1 s: the page pings when idle, stays while
    pongs come back, and reconnects on its own once they stop."""
    chat = new_chat()
    pings: list[int] = []
    connections: list[float] = []

    def mock(ws: WebSocketRoute) -> None:
        number = len(connections) + 1
        connections.append(time.monotonic())
        user = {"id": "mock-user", "name": f"mock{number}"}

        def on_message(message: str | bytes) -> None:
            frame = _frame(message)
            if frame.get("type") == "join":
                ws.send(
                    json.dumps(
                        {
                            "type": "joined",
                            "room": frame["room"],
                            "epoch": "e1",
                            "offset": 0,
                            "recovered": False,
                            "online": 1,
                            "presence": [user],
                            "ref": frame["ref"],
                        }
                    )
                )
            elif frame.get("type") == "ping":
                pings.append(number)
                if number == 1 and len(pings) <= 2:  # then silence
                    ws.send(json.dumps({"type": "pong", "ref": frame.get("ref")}))

        ws.on_message(on_message)
        ws.send(
            json.dumps(
                {
                    "type": "welcome",
                    "conn": f"c{number}",
                    "user": user,
                    "protocol": 1,
                    "heartbeat": 1,
                }
            )
        )

    chat.page.route_web_socket(WS_URL, mock)
    chat.join(web, "alice", _room())
    chat.page.wait_for_function(
        "() => window.roomcast.user && window.roomcast.user.name === 'mock2'", timeout=20_000
    )
    expect(chat.page.locator("#status")).to_contain_text("online", timeout=WAIT)
    # Two pongs kept the first connection; the third ping went unanswered.
    assert pings[:3] == [1, 1, 1], pings
    assert connections[1] - connections[0] >= 3.0
