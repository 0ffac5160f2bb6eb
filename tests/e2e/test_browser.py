"""The chat page, for real: Debian chromium driven by Playwright against `roomcast serve`.

The page uses nothing but roomcast.js. Every page gets its own browser context (its own
storage, so its own `client` id). Waits are Playwright's auto-waiting `expect` with explicit
timeouts; nothing sleeps.
"""

from __future__ import annotations

import hashlib
import json
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
    ConsoleMessage,
    Dialog,
    Page,
    WebSocket,
    WebSocketRoute,
    expect,
)

from ..brokers import free_port
from ..proxy import Proxy
from ..servers import Server, start_app, start_server

WAIT = 10_000  # ms: generous, for a loaded 2-core machine
RECONNECT_WAIT = 30_000  # ms: the heartbeat notices a silent cut, then backoff
WS_URL = re.compile(r"/ws\?")
GAP = "Some messages could not be recovered"
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
    console_errors: list[str] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)  # of every WebSocket the page opened

    def join(self, server: Server | str, name: str, room: str) -> Chat:
        page = self.page
        page.goto((server if isinstance(server, str) else server.http) + "/")
        page.fill("#name", name)
        page.fill("#room", room)
        page.click("#connect")
        expect(page.locator("#status")).to_contain_text("online", timeout=WAIT)
        expect(page.locator("#join-form")).to_be_hidden()
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
        value = self.page.evaluate("sessionStorage.getItem('roomcast.client')")
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
def web() -> Iterator[Server]:
    srv = start_server()
    yield srv
    srv.terminate()


@pytest.fixture
def new_chat(browser: Browser) -> Iterator[Callable[..., Chat]]:
    chats: list[Chat] = []

    def make(width: int = 1280) -> Chat:
        context = browser.new_context(viewport={"width": width, "height": 760})
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

        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error":
                chat.console_errors.append(message.text)

        chat.page.on("console", on_console)
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


@pytest.fixture(scope="module", params=["off", "shared", "per-connection"])
def compression(request: pytest.FixtureRequest) -> Iterator[Server]:
    """The page under each WS_COMPRESSION: a browser always offers permessage-deflate."""
    srv = start_server({"WS_COMPRESSION": request.param})
    yield srv
    srv.terminate()


def test_two_users_see_each_other_and_chat(
    compression: Server, new_chat: Callable[..., Chat]
) -> None:
    web = compression
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
    # A long chat: compressed where deflate was negotiated, whole in the page either way.
    long_text = "a long line, " * 60
    bob.say(long_text)
    for chat in (alice, bob):
        expect(chat.page.locator("#messages .msg .text").nth(2)).to_have_text(
            long_text.strip(), timeout=WAIT
        )


def test_user_text_is_rendered_as_text(web: Server, new_chat: Callable[..., Chat]) -> None:
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


@dataclass
class Outage:
    """How the page loses the server, and gets it back."""

    kind: str
    server: Server
    proxy: Proxy | None = None
    url: str = ""

    def start(self) -> None:
        if self.proxy is not None:
            self.proxy.cut()  # silent: the page's heartbeat has to notice
        else:
            self.server.terminate()  # SIGTERM: 1012, and history in memory is gone

    def end(self) -> None:
        if self.proxy is not None:
            self.proxy.restore()
        else:
            self.server = start_server(self.server.env, ["--port", str(self.server.port)])


@pytest.fixture(params=["recovered", "history trimmed", "server restarted"])
def outage(request: pytest.FixtureRequest) -> Iterator[Outage]:
    env = {"HEARTBEAT_SECONDS": "2", "CONNECT_RATE": "1000", "RATE_LIMIT": "1000"}
    if request.param == "history trimmed":
        env |= {"HISTORY_SIZE": "4", "OUTBOX_SIZE": "3"}
    if request.param == "server restarted":
        server = start_server(env, ["--port", str(free_port())])
        found = Outage(request.param, server, url=server.http)
    else:
        server = start_server(env)
        proxy = Proxy(server.port)
        found = Outage(request.param, server, proxy, f"http://127.0.0.1:{proxy.port}")
    yield found
    if found.proxy is not None:
        found.proxy.close()
    found.server.terminate()


@pytest.mark.slow
def test_page_recovers_after_an_outage(outage: Outage, new_chat: Callable[..., Chat]) -> None:
    """alice's page loses the server while bob chats on. Back online, what is on screen
    stays; what she missed is recovered, or, when the room's history lost it, the gap is
    marked once and the room's recent history is shown after it, each message once. While
    disconnected, her online list is not a list of people known to be online."""
    room = _room()
    alice = new_chat().join(outage.url, "alice", room)
    bob = new_chat().join(outage.server.http if outage.proxy else outage.url, "bob", room)
    bob.say("seen")
    expect(alice.page.locator("#messages .msg .text")).to_have_text(["seen"], timeout=WAIT)
    expect(alice.page.locator("#online li")).to_have_count(2, timeout=WAIT)

    outage.start()
    expect(alice.page.locator("#status")).to_contain_text("reconnecting", timeout=RECONNECT_WAIT)
    expect(alice.page.locator("#online li")).to_have_count(0)
    expect(alice.page.locator("aside")).to_have_attribute("data-stale", "true")
    expect(alice.page.locator("#online-count")).to_have_text("…")
    if outage.proxy is not None:
        expect(bob.page.locator("#online-count")).to_have_text("1", timeout=RECONNECT_WAIT)
        for i in range(6):  # offsets 2..7; with HISTORY_SIZE 4 the room retains 4..7
            bob.say(f"later {i}")
            expect(bob.page.locator("#messages .msg")).to_have_count(2 + i, timeout=WAIT)
    outage.end()

    expect(alice.page.locator("#status")).to_contain_text("online", timeout=RECONNECT_WAIT)
    shown = alice.page.locator("#messages .msg .text")
    if outage.kind == "recovered":
        expect(shown).to_have_text(["seen"] + [f"later {i}" for i in range(6)], timeout=WAIT)
        assert alice.offsets() == [1, 2, 3, 4, 5, 6, 7]
    elif outage.kind == "history trimmed":
        expected = ["seen", "later 2", "later 3", "later 4", "later 5"]
        expect(shown).to_have_text(expected, timeout=WAIT)
        assert alice.offsets() == [1, 4, 5, 6, 7]
    else:
        expect(alice.page.locator("#messages .system.gap")).to_have_count(1, timeout=WAIT)
        expect(shown).to_have_text(["seen"])  # kept: the new epoch has nothing yet
    gaps = 0 if outage.kind == "recovered" else 1
    expect(alice.page.locator("#messages .system.gap")).to_have_count(gaps, timeout=WAIT)
    expect(alice.page.locator("#notice")).not_to_contain_text(GAP)
    expect(alice.page.locator("#online li")).to_have_count(2, timeout=RECONNECT_WAIT)

    # Live chat flows both ways afterwards, shown once each.
    alice.say("back")
    for chat in (alice, bob):
        expect(chat.page.locator("#messages .msg .text").last).to_have_text(
            "back", timeout=RECONNECT_WAIT
        )
    texts = alice.texts()
    assert texts.count("back") == 1 and texts.count("seen") == 1
    joins = [f for f in alice.sent if f.get("type") == "join"]
    assert "since" in joins[1], joins  # the rejoin asked from the last offset shown
    assert joins[1]["since"]["offset"] == 1


def test_client_id_survives_a_reload(web: Server, new_chat: Callable[..., Chat]) -> None:
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


def test_invalid_room_is_refused_in_the_page(web: Server, new_chat: Callable[..., Chat]) -> None:
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


def test_duplicate_frames_are_shown_once(web: Server, new_chat: Callable[..., Chat]) -> None:
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


@pytest.fixture(params=["serve", "mounted at /rt"])
def any_mount(request: pytest.FixtureRequest) -> Iterator[Server]:
    srv = start_server() if request.param == "serve" else start_app("tests.hostapp:app", "/rt")
    yield srv
    srv.terminate()


@pytest.mark.slow
def test_page_runs_under_its_own_csp_without_console_errors(
    any_mount: Server, new_chat: Callable[..., Chat]
) -> None:
    """Security headers on the page; no inline script or style; everything it loads comes
    by relative URL (so it works under a prefix); no console error while it is used."""
    room = _room()
    alice = new_chat()
    response = alice.page.goto(any_mount.http + "/")
    assert response is not None and response.ok
    headers = response.headers
    csp = headers["content-security-policy"]
    for directive in ("default-src 'self'", "script-src 'self'", "frame-ancestors 'none'"):
        assert directive in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["x-content-type-options"] == "nosniff"
    inline = "document.querySelectorAll('script:not([src]), style, [style]').length"
    assert alice.page.evaluate(inline) == 0
    alice.join(any_mount, "alice", room)
    bob = new_chat().join(any_mount, "bob", room)
    alice.say("under a strict CSP")
    expect(bob.page.locator("#messages .msg .text")).to_have_text(["under a strict CSP"])
    assert all(url.startswith(any_mount.ws + "/ws?") for url in alice.urls), alice.urls
    for chat in (alice, bob):
        assert chat.console_errors == [], chat.console_errors


def test_leave_and_switch_rooms_in_390px(web: Server, new_chat: Callable[..., Chat]) -> None:
    first, second = _room(), _room()
    alice = new_chat(390).join(web, "alice", first)
    bob = new_chat().join(web, "bob", first)
    page = alice.page
    alice.say("in the first room, with a long word: " + "w" * 80)
    expect(bob.page.locator("#messages .msg")).to_have_count(1, timeout=WAIT)
    expect(page.locator("#current-room")).to_have_text(first)
    # Nothing is wider than the phone's screen.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    for selector in ("#leave", "#status", "#send", "#text", "#online", "#messages .msg"):
        box = page.locator(selector).first.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, selector

    page.click("#leave")
    expect(page.locator("#join-form")).to_be_visible()
    expect(page.locator("#messages > *")).to_have_count(0)
    expect(bob.page.locator("#messages .system").last).to_have_text("alice left", timeout=WAIT)
    page.fill("#room", second)
    page.click("#connect")
    expect(page.locator("#status")).to_contain_text(f"online · {second}", timeout=WAIT)
    expect(page.locator("#join-form")).to_be_hidden()
    bob.say("not for alice any more")
    alice.say("in the second room")
    expect(page.locator("#messages .msg .text")).to_have_text(["in the second room"])
    expect(page.locator("#online li")).to_have_text(["alice"])
    assert page.evaluate("document.documentElement.scrollWidth") <= 390


# --- JWT_SECRET mode: the page with tokens, behind ALLOWED_ORIGINS ----------------


def _token(sub: str, *, secret: str = SECRET, ttl: float = 3600, **claims: Any) -> str:
    """A token minted here with PyJWT, as the application's backend would."""
    payload: dict[str, Any] = {"sub": sub, "exp": int(time.time() + ttl), **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


def _team() -> str:
    return "team-" + uuid.uuid4().hex[:10]


def _refused(chat: Chat, code: int) -> None:
    """Closed with `code`, for good: roomcast.js's state is `closed`, no second socket."""
    page = chat.page
    expect(page.locator("#status")).to_have_attribute("data-state", "disconnected", timeout=WAIT)
    expect(page.locator("#status")).to_contain_text(f"({code})")
    assert page.evaluate("window.roomcast.client.state") == "closed"
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


def test_token_page_chats_as_the_token_user(secured: Server, new_chat: Callable[..., Chat]) -> None:
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
    secured: Server, new_chat: Callable[..., Chat]
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
        ("expired", "Your token has expired"),
    ],
)
def test_refused_token_then_a_pasted_one_connects(
    secured: Server, new_chat: Callable[..., Chat], kind: str, problem: str
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
    # Without a token, or with an expired one, nothing is tried; a refused one (4401) makes
    # the page ask for another.
    tried = 1 if kind == "other-secret" else 0
    assert len(chat.urls) == tried
    expect(page.locator("#token")).to_be_visible()
    # A refused token is not kept for the next reload.
    assert page.evaluate("sessionStorage.getItem('roomcast.token')") is None

    good = _token("alice", name="Alice", rooms=["team-*"])
    page.fill("#token", good)
    page.click("#connect")
    expect(page.locator("#status")).to_contain_text("online", timeout=WAIT)
    expect(page.locator("#me")).to_have_text("Alice", timeout=WAIT)
    expect(page.locator("#notice")).to_be_empty()
    assert page.evaluate("sessionStorage.getItem('roomcast.token')") == good
    assert len(chat.urls) == tried + 1


def test_room_not_in_the_token_is_forbidden(secured: Server, new_chat: Callable[..., Chat]) -> None:
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
    expect(page.locator("#join-form")).to_be_visible()

    # A room the token permits, from the same page.
    page.fill("#room", _team())
    page.click("#connect")
    expect(page.locator("#status")).to_contain_text("online", timeout=WAIT)
    expect(page.locator("#me")).to_have_text(EVIL_NAME, timeout=WAIT)
    expect(page.locator("#online li.me")).to_have_text(EVIL_NAME, timeout=WAIT)
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    assert chat.dialogs == []


@pytest.mark.slow
def test_expiring_token_is_warned_about_and_refreshed(
    secured: Server, new_chat: Callable[..., Chat]
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
    # Until the first token has expired (the page's CSP forbids wait_for_function's eval).
    while page.evaluate("Date.now()") <= (expires + 1) * 1000:
        page.wait_for_timeout(200)
    chat.say("still here")
    expect(page.locator("#messages .msg .text")).to_have_text(["still here"], timeout=WAIT)
    expect(page.locator("#status")).to_contain_text("online")
    assert len(chat.urls) == 1

    # Another user's token is no renewal: leave, and the page connects as that user instead.
    page.click("#leave")
    page.fill("#token", _token("bob", name="Bob", rooms=["team-*"]))
    page.fill("#room", room)
    page.click("#connect")
    expect(page.locator("#me")).to_have_text("Bob", timeout=WAIT)
    expect(page.locator("#status")).to_contain_text("online", timeout=WAIT)
    assert [f["token"] for f in chat.sent if f.get("type") == "refresh"] == [fresh]
    assert len(chat.urls) == 2
