"""The chat page, for real: Debian chromium driven by Playwright against `roomcast serve`.

Every page gets its own browser context (its own localStorage, so its own
`client` id). Waits are Playwright's auto-waiting `expect` with explicit
timeouts; nothing sleeps.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jwt
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

from ..brokers import free_port
from ..servers import Server, start_server

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
SECRET = "page-secret-" + "x" * 60  # 64+ bytes: PyJWT warns about keys shorter than the hash
OTHER_SECRET = "other-secret-" + "y" * 60
ORIGIN_NOTICE = "This page's origin is not allowed by the server (ALLOWED_ORIGINS)"


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

    def enter(self, url: str, room: str, token: str | None = None) -> Chat:
        """Open the page of a JWT_SECRET server (with `#token=` when given) and connect to
        `room`; what happens next is the test's to expect."""
        page = self.page
        page.goto(url + (f"#token={token}" if token else ""))
        expect(page.locator("#token")).to_be_visible(timeout=WAIT)
        expect(page.locator("#name")).to_be_hidden()
        page.fill("#room", room)
        page.click("#connect")
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

    @property
    def user_id(self) -> str:
        """The public id the server derives from the page's secret `client` id."""
        return "anon-" + hashlib.sha256(self.client_id.encode()).hexdigest()[:20]

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
        expect(me.page.locator(f'#online li[data-user-id="{other.user_id}"]')).to_have_count(1)
        expect(me.page.locator(f'#online li.me[data-user-id="{me.user_id}"]')).to_have_count(1)
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
    assert before == alice.user_id  # derived from the client id the page keeps

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
    assert all(f"client={alice.client_id}&" in url for url in alice.urls)


def test_invalid_room_is_refused_in_the_page(web: Server, new_chat: Callable[[], Chat]) -> None:
    chat = new_chat()
    page = chat.page
    page.goto(web.http + "/")
    expect(page.locator("#room")).to_have_value("lobby")
    # Anonymous mode: a display name, no token field.
    expect(page.locator("#name")).to_be_visible()
    expect(page.locator("#token")).to_be_hidden()
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


# --- JWT_SECRET mode: the page with tokens, behind ALLOWED_ORIGINS ----------------


def _token(sub: str, *, secret: str = SECRET, ttl: float = 3600, **claims: Any) -> str:
    """A token minted here with PyJWT, as the application's backend would."""
    payload: dict[str, Any] = {"sub": sub, "exp": int(time.time() + ttl), **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


def _team() -> str:
    return "team-" + uuid.uuid4().hex[:10]


def _refused(chat: Chat, code: int) -> None:
    """Closed with `code`, and not retrying: no backoff timer, no second socket."""
    page = chat.page
    expect(page.locator("#status")).to_have_attribute("data-state", "disconnected", timeout=WAIT)
    assert page.evaluate("window.roomcast.lastClose") == code
    assert page.evaluate("window.roomcast.retrying") is False
    assert page.evaluate("window.roomcast.attempt") == 0
    assert len(chat.urls) == 1


@pytest.fixture(scope="module")
def secured() -> Iterator[Server]:
    """JWT_SECRET set, and ALLOWED_ORIGINS listing only the page's own origin."""
    port = free_port()
    env = {"JWT_SECRET": SECRET, "ALLOWED_ORIGINS": f"http://127.0.0.1:{port}"}
    srv = start_server(env, ["--port", str(port)])
    assert srv.port == port
    yield srv
    srv.terminate()


def test_token_page_chats_as_the_token_user(secured: Server, new_chat: Callable[[], Chat]) -> None:
    room = _team()
    alice_token = _token("alice", name="Alice", rooms=["team-*"])
    alice = new_chat().enter(secured.http + "/", room, alice_token)
    page = alice.page
    expect(page.locator("#status")).to_contain_text("online", timeout=WAIT)
    # The fragment left the address bar for this tab's sessionStorage.
    assert page.evaluate("location.hash") == ""
    assert page.evaluate("sessionStorage.getItem('roomcast.token')") == alice_token
    expect(page.locator("#token")).to_have_attribute("type", "password")
    expect(page.locator("#me")).to_have_text("Alice", timeout=WAIT)
    alice.say("hello as Alice")
    expect(page.locator("#messages .msg.mine .text")).to_have_text(["hello as Alice"], timeout=WAIT)
    expect(page.locator("#messages .msg .who")).to_have_text(["Alice"])

    bob = new_chat().enter(secured.http + "/", room, _token("bob", name="Bob", rooms=["team-*"]))
    expect(bob.page.locator("#status")).to_contain_text("online", timeout=WAIT)
    expect(bob.page.locator("#messages .msg .text")).to_have_text(["hello as Alice"], timeout=WAIT)
    expect(bob.page.locator("#messages .msg .who")).to_have_text(["Alice"])
    for me, names in ((alice, ["Alice", "Bob"]), (bob, ["Bob", "Alice"])):
        expect(me.page.locator("#online li")).to_have_text(names, timeout=WAIT)
        expect(me.page.locator("#online-count")).to_have_text("2", timeout=WAIT)
    expect(page.locator('#online li.me[data-user-id="alice"]')).to_have_count(1)
    expect(bob.page.locator('#online li.me[data-user-id="bob"]')).to_have_count(1)

    # The token went in the handshake's subprotocols: never in a URL, never echoed back.
    for chat in (alice, bob):
        assert chat.urls and all("token" not in url and "username=" not in url for url in chat.urls)
        assert chat.page.evaluate("window.roomcast.socket.protocol") == "roomcast.v1"
    assert alice_token not in secured.log()

    page.reload()  # the token survives in sessionStorage; the page comes back by itself
    expect(page.locator("#status")).to_contain_text("online", timeout=WAIT)
    expect(page.locator("#me")).to_have_text("Alice", timeout=WAIT)
    expect(page.locator("#token")).to_have_value(alice_token)
    assert page.evaluate("location.hash") == ""
    assert len(alice.urls) == 2
    expect(bob.page.locator("#online-count")).to_have_text("2", timeout=WAIT)
    alice.say("back after a reload")
    expect(bob.page.locator("#messages .msg .who")).to_have_text(["Alice", "Alice"], timeout=WAIT)


def test_token_page_from_an_unlisted_origin_is_refused(
    secured: Server, new_chat: Callable[[], Chat]
) -> None:
    """`localhost` reaches the same server (127.0.0.1) but is another origin."""
    chat = new_chat()
    other_origin = f"http://localhost:{secured.port}/"
    chat.enter(other_origin, _team(), _token("alice", name="Alice", rooms=["team-*"]))
    expect(chat.page.locator("#notice")).to_contain_text(ORIGIN_NOTICE, timeout=WAIT)
    expect(chat.page.locator("#notice")).to_contain_text("http://localhost:")
    _refused(chat, 4403)
    assert [f.get("code") for f in chat.received] == ["origin_not_allowed"]


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("missing", "This server needs a token"),
        ("other-secret", "Your token was refused: The token's signature does not verify"),
        ("expired", "Your token was refused: The token has expired"),
    ],
)
def test_refused_token_then_a_pasted_one_connects(
    secured: Server, new_chat: Callable[[], Chat], kind: str, problem: str
) -> None:
    bad = {
        "missing": None,
        "other-secret": _token("alice", secret=OTHER_SECRET, name="Alice"),
        "expired": _token("alice", ttl=-60, name="Alice"),
    }[kind]
    room = _team()
    chat = new_chat().enter(secured.http + "/", room, bad)
    page = chat.page
    expect(page.locator("#notice")).to_contain_text(problem, timeout=WAIT)
    _refused(chat, 4401)
    # A refused token is not kept for the next reload.
    assert page.evaluate("sessionStorage.getItem('roomcast.token')") is None

    good = _token("alice", name="Alice", rooms=["team-*"])
    page.fill("#token", good)
    page.click("#connect")
    expect(page.locator("#status")).to_contain_text("online", timeout=WAIT)
    expect(page.locator("#me")).to_have_text("Alice", timeout=WAIT)
    expect(page.locator("#notice")).to_be_empty()
    assert page.evaluate("sessionStorage.getItem('roomcast.token')") == good
    assert len(chat.urls) == 2


def test_room_not_in_the_token_is_forbidden(secured: Server, new_chat: Callable[[], Chat]) -> None:
    """The token's name (markup here) is shown as text, like everything a token supplies."""
    chat = new_chat().enter(
        secured.http + "/", "lobby", _token("mallory", name=EVIL_NAME, rooms=["team-*"])
    )
    page = chat.page
    expect(page.locator("#notice")).to_contain_text(
        "Cannot join lobby: Your token does not permit room 'lobby'.", timeout=WAIT
    )
    expect(page.locator("#status")).to_have_attribute("data-state", "disconnected", timeout=WAIT)
    assert [f.get("code") for f in chat.received if f.get("type") == "error"] == ["forbidden"]
    assert page.evaluate("window.roomcast.retrying") is False

    # A room the token permits, from the same page.
    page.fill("#room", _team())
    page.click("#connect")
    expect(page.locator("#status")).to_contain_text("online", timeout=WAIT)
    expect(page.locator("#me")).to_have_text(EVIL_NAME, timeout=WAIT)
    expect(page.locator("#online li.me")).to_have_text(EVIL_NAME, timeout=WAIT)
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    assert chat.dialogs == []


def test_expiring_token_is_warned_about_and_refreshed(
    secured: Server, new_chat: Callable[[], Chat]
) -> None:
    """Pasting a new token while connected sends `refresh`: the connection outlives the
    first token's `exp` (at which the server would close it with 4401)."""
    room = _team()
    short = _token("alice", ttl=8, name="Alice", rooms=["team-*"])
    chat = new_chat().enter(secured.http + "/", room, short)
    page = chat.page
    expect(page.locator("#status")).to_contain_text("online", timeout=WAIT)
    expect(page.locator("#notice")).to_contain_text("Your token expires in", timeout=WAIT)

    fresh = _token("alice", name="Alice", rooms=["team-*"])
    page.fill("#token", fresh)
    page.click("#connect")
    expect(page.locator("#notice")).to_have_text("Token renewed.", timeout=WAIT)
    assert [f["token"] for f in chat.sent if f.get("type") == "refresh"] == [fresh]
    assert page.evaluate("sessionStorage.getItem('roomcast.token')") == fresh

    expires = jwt.decode(short, options={"verify_signature": False})["exp"]
    page.wait_for_function(f"Date.now() > {(expires + 1) * 1000}", timeout=WAIT + 8_000)
    chat.say("still here")
    expect(page.locator("#messages .msg .text")).to_have_text(["still here"], timeout=WAIT)
    expect(page.locator("#status")).to_contain_text("online")
    assert page.evaluate("window.roomcast.lastClose") is None
    assert len(chat.urls) == 1

    # Another user's token is no renewal: the page reconnects as that user instead.
    page.fill("#token", _token("bob", name="Bob", rooms=["team-*"]))
    page.click("#connect")
    expect(page.locator("#me")).to_have_text("Bob", timeout=WAIT)
    expect(page.locator("#status")).to_contain_text("online", timeout=WAIT)
    assert [f["token"] for f in chat.sent if f.get("type") == "refresh"] == [fresh]
    assert len(chat.urls) == 2
