"""roomcast.js in Chromium against real servers: its API, and how it survives restarts,
network cuts, a slow-consumer close, lost history, expiring tokens and final closes.

Each test drives `Client`s inside a page (window.clients) and reads what they emitted
(window.logs). Waits are Playwright's `wait_for_function` with explicit timeouts.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from playwright.sync_api import Browser, Page, WebSocket, WebSocketRoute

from ..brokers import free_port
from ..proxy import Proxy
from ..servers import Server, start_server
from ..support import http

WAIT = 15_000  # ms: generous, for a loaded 2-core machine
SECRET = "js-secret-" + "z" * 60
API_KEY = "js-api-key-0123456789"

HARNESS = """
async (base) => {
  const rc = await import(base + "/roomcast.js");
  Object.assign(window, { rc, clients: {}, logs: {} });
  const TYPES = ["chat", "notification", "system", "joined", "welcome", "error", "presence"];
  window.make = (name, url, options = {}) => {
    if (options.refresh) options.tokenRefresh = () => window.mintToken();
    delete options.refresh;
    const c = new rc.Client(url, options);
    const log = (window.logs[name] = []);
    for (const t of TYPES) c.on(t, (e) => log.push({ ...e, kind: t }));
    c.on("recoveryFailed", (e) => log.push({ kind: "recoveryFailed", room: e.room }));
    c.on("state", (s, info) => log.push({ kind: "state", state: s, code: info.code ?? null }));
    window.clients[name] = c;
    return c.clientId;
  };
  // A promise's outcome as data: {ok: value} or {error: code, closeCode}.
  window.settle = (p) => p.then(
    (ok) => ({ ok }),
    (e) => ({ error: e.code, closeCode: e.closeCode, detail: e.detail }),
  );
  window.enter = async (n, r) => { await clients[n].connect(); await clients[n].join(r); };
}
"""


@dataclass
class Tab:
    page: Page
    sockets: list[WebSocket] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def js(self, expression: str, arg: Any = None) -> Any:
        return self.page.evaluate(expression, arg)

    def make(self, name: str, url: str, **options: Any) -> str:
        client_id: str = self.js("([n, u, o]) => make(n, u, o)", [name, url, options])
        return client_id

    def log(self, name: str, event: str | None = None) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = self.js("n => logs[n]", name)
        return [e for e in entries if event is None or e["kind"] == event]

    def states(self, name: str) -> list[tuple[str, int | None]]:
        return [(e["state"], e["code"]) for e in self.log(name, "state")]

    def until(self, predicate: str, arg: Any = None, timeout: float = WAIT) -> None:
        self.page.wait_for_function(predicate, arg=arg, timeout=timeout)

    def until_state(self, name: str, state: str, timeout: float = WAIT) -> None:
        self.until("([n, s]) => clients[n].state === s", [name, state], timeout)

    def offsets(self, name: str, room: str) -> list[int]:
        return [e["offset"] for e in self.log(name, "chat") if e["room"] == room]


@pytest.fixture
def new_tab(browser: Browser) -> Iterator[Callable[[Server], Tab]]:
    tabs: list[tuple[Any, Tab]] = []

    def make(server: Server) -> Tab:
        context = browser.new_context()
        tab = Tab(context.new_page())
        tab.page.on("pageerror", lambda exc: tab.errors.append(str(exc)))

        def on_socket(ws: WebSocket) -> None:
            tab.sockets.append(ws)
            ws.on("framesent", lambda data: tab.sent.append(json.loads(data)))

        tab.page.on("websocket", on_socket)
        tab.page.goto(server.http + "/healthz")
        tab.js(HARNESS, server.http)
        tabs.append((context, tab))
        return tab

    yield make
    for context, tab in tabs:
        context.close()
        assert tab.errors == [], f"JavaScript errors: {tab.errors}"


@pytest.fixture(scope="module")
def web() -> Iterator[Server]:
    srv = start_server({"CONNECT_RATE": "1000", "RATE_LIMIT": "1000"})
    yield srv
    srv.terminate()


def _room() -> str:
    return "js-" + uuid.uuid4().hex[:10]


def test_api_join_history_send_presence_leave_and_unsubscribe(
    web: Server, new_tab: Callable[[Server], Tab]
) -> None:
    tab = new_tab(web)
    room = _room()
    # One client id per tab, kept in sessionStorage; another client gets its own.
    ann = tab.make("ann", web.ws, username="ann")
    assert tab.make("again", web.ws) == ann == tab.js("sessionStorage.getItem('roomcast.client')")
    bob = tab.make("bob", web.ws, username="bob", client="bob-" + uuid.uuid4().hex[:8])
    assert bob != ann
    welcome = tab.js("settle(clients.bob.connect())")["ok"]
    assert welcome["user"]["name"] == "bob" and welcome["heartbeat"] > 0
    tab.js("r => clients.bob.join(r)", room)
    for i in range(3):
        assert tab.js("([r, t]) => clients.bob.send(r, t)", [room, f"early {i}"]) == {
            "room": room,
            "offset": i + 1,
        }

    tab.js("settle(clients.ann.connect())")
    # The replayed messages are emitted before join() resolves.
    joined = tab.js(
        """async (r) => {
            const j = await clients.ann.join(r, { history: 2 });
            return { j, before: logs.ann.filter((e) => e.kind === "chat").map((e) => e.offset) };
        }""",
        room,
    )
    assert joined["before"] == [2, 3]
    assert joined["j"]["type"] == "joined" and joined["j"]["offset"] == 3
    assert {u["name"] for u in joined["j"]["presence"]} == {"ann", "bob"}

    ack = tab.js("([r, t]) => clients.ann.send(r, t)", [room, "hello"])
    assert ack == {"room": room, "offset": 4}
    tab.until("r => logs.bob.some((e) => e.kind === 'chat' && e.offset === 4)", room)
    presence = tab.js("r => clients.ann.presence(r)", room)
    assert presence["type"] == "presence" and presence["online"] == 2
    # Answers resolve their request and are not emitted as events.
    assert tab.log("ann", "presence") == [] and tab.log("ann", "joined") == []

    # `on` returns an unsubscribe function: that listener hears no more.
    tab.js(
        """() => { window.heard = [];
            window.off = clients.ann.on("chat", (m) => heard.push(m.offset)); }"""
    )
    tab.js("([r, t]) => clients.bob.send(r, t)", [room, "heard"])
    tab.until("() => heard.includes(5)")
    tab.js("() => off()")
    tab.js("([r, t]) => clients.bob.send(r, t)", [room, "not heard"])
    tab.until("() => logs.ann.some((e) => e.kind === 'chat' && e.offset === 6)")
    assert tab.js("heard") == [5]

    left = tab.js("r => clients.ann.leave(r)", room)
    assert left["type"] == "left" and left["room"] == room
    tab.js("([r, t]) => clients.bob.send(r, t)", [room, "after ann left"])
    tab.until("() => logs.bob.some((e) => e.kind === 'chat' && e.offset === 7)")
    tab.until(
        "r => logs.bob.some((e) => e.kind === 'system' && e.event === 'leave' && "
        "e.user.name === 'ann' && e.room === r)",
        room,
    )
    assert tab.offsets("ann", room) == [2, 3, 4, 5, 6]
    assert tab.offsets("bob", room) == [1, 2, 3, 4, 5, 6, 7]
    # Requests carried a fresh ref each; answers were matched by it.
    chats = [f for f in tab.sent if f["type"] == "chat"]
    assert len({f["ref"] for f in chats}) == len(chats) == 7
    tab.js("() => { clients.ann.close(); clients.bob.close(); }")
    assert tab.states("ann")[-1] == ("closed", 1000)


def _start_on(port: int, env: dict[str, str]) -> Server:
    return start_server(env, ["--port", str(port)])


@pytest.mark.slow
def test_restart_on_sqlite_history_emits_every_offset_once(
    new_tab: Callable[[Server], Tab],
) -> None:
    """SIGTERM (1012) and a restart on durable history: the client rejoins with `since`,
    gets what it missed once, and the chats sent while the server was down are stored
    and acknowledged once each."""
    port = free_port()
    env = {"HISTORY_URL": f"sqlite:///{tempfile.mkdtemp()}/history.db", "RATE_LIMIT": "1000"}
    srv = _start_on(port, env)
    try:
        tab = new_tab(srv)
        room = _room()
        tab.make("ann", srv.ws, username="ann")
        tab.js("r => enter('ann', r)", room)
        for i in range(5):
            tab.js("([r, t]) => clients.ann.send(r, t)", [room, f"before {i}"])
        tab.until("() => logs.ann.filter((e) => e.kind === 'chat').length === 5")

        srv.terminate()
        tab.until_state("ann", "reconnecting")
        assert ("reconnecting", 1012) in tab.states("ann")
        # Sent while the server is down: they wait in the buffer.
        tab.js(
            """(r) => { window.down = [0, 1, 2].map((i) =>
                settle(clients.ann.send(r, `while down ${i}`))); }""",
            room,
        )
        srv = _start_on(port, env)
        tab.until_state("ann", "open", 30_000)
        acks = tab.js("Promise.all(down)")
        assert [a["ok"] for a in acks] == [{"room": room, "offset": o} for o in (6, 7, 8)]

        # Another client, after the restart: ann hears it once too.
        tab.make("bob", srv.ws, username="bob", client="bob-" + uuid.uuid4().hex[:8])
        tab.js("r => enter('bob', r)", room)
        tab.js("([r, t]) => clients.bob.send(r, t)", [room, "after the restart"])
        tab.until("() => logs.ann.filter((e) => e.kind === 'chat').length >= 9")
        assert tab.offsets("ann", room) == list(range(1, 10))
        texts = [e["text"] for e in tab.log("ann", "chat")]
        assert texts[5:] == ["while down 0", "while down 1", "while down 2", "after the restart"]
        assert tab.log("ann", "recoveryFailed") == []
        rejoins = [f for f in tab.sent if f["type"] == "join" and "since" in f]
        assert [f["since"]["offset"] for f in rejoins] == [5]
        # Each chat sent while down went out once, after the rejoin.
        down = [f for f in tab.sent if f["type"] == "chat" and "while down" in f["text"]]
        assert len(down) == 3 and len({f["ref"] for f in down}) == 3
    finally:
        srv.terminate()


@pytest.mark.slow
def test_recovery_failed_after_a_restart_on_memory_history(
    new_tab: Callable[[Server], Tab],
) -> None:
    port = free_port()
    srv = _start_on(port, {})
    try:
        tab = new_tab(srv)
        room = _room()
        tab.make("ann", srv.ws, username="ann")
        tab.js("r => enter('ann', r)", room)
        tab.js("([r, t]) => clients.ann.send(r, t)", [room, "lost with the process"])
        srv.terminate()
        tab.until_state("ann", "reconnecting")
        srv = _start_on(port, {})
        tab.until_state("ann", "open", 30_000)
        tab.until("() => logs.ann.some((e) => e.kind === 'recoveryFailed')")
        assert [e["room"] for e in tab.log("ann", "recoveryFailed")] == [room]
        rejoined = tab.log("ann", "joined")
        assert [(j["room"], j["recovered"]) for j in rejoined] == [(room, False)]
        # Still joined, in the room's new epoch: live messages flow.
        ack = tab.js("([r, t]) => clients.ann.send(r, t)", [room, "new epoch"])
        assert ack == {"room": room, "offset": 1}
        tab.until("() => logs.ann.filter((e) => e.kind === 'chat').length === 2")
        chats = tab.log("ann", "chat")
        assert chats[0]["epoch"] != chats[1]["epoch"]
    finally:
        srv.terminate()


@pytest.fixture
def proxied() -> Iterator[tuple[Server, Proxy]]:
    srv = start_server({"HEARTBEAT_SECONDS": "2", "RATE_LIMIT": "1000", "CONNECT_RATE": "1000"})
    proxy = Proxy(srv.port)
    yield srv, proxy
    proxy.close()
    srv.terminate()


@pytest.mark.slow
def test_network_cut_through_a_proxy_reconnects_and_recovers(
    proxied: tuple[Server, Proxy], new_tab: Callable[[Server], Tab]
) -> None:
    """The network goes silent: the heartbeat notices (no `pong`), the client reconnects
    once the network is back, and recovers what was said meanwhile."""
    srv, proxy = proxied
    tab = new_tab(srv)
    room = _room()
    tab.make("ann", f"ws://127.0.0.1:{proxy.port}", username="ann", backoff=[0.2, 1])
    tab.make("bob", srv.ws, username="bob", client="bob-" + uuid.uuid4().hex[:8])
    for name in ("ann", "bob"):
        tab.js("([n, r]) => enter(n, r)", [name, room])
    tab.js("([r, t]) => clients.bob.send(r, t)", [room, "before the cut"])
    tab.until("() => logs.ann.filter((e) => e.kind === 'chat').length === 1")

    proxy.cut()
    tab.until_state("ann", "reconnecting")
    for i in range(3):
        tab.js("([r, t]) => clients.bob.send(r, t)", [room, f"during the cut {i}"])
    # A send while cut off waits for the network.
    tab.js("(r) => { window.mine = clients.ann.send(r, 'sent while cut off'); }", room)
    proxy.restore()
    tab.until_state("ann", "open", 30_000)
    assert tab.js("mine") == {"room": room, "offset": 5}
    tab.until("() => logs.ann.filter((e) => e.kind === 'chat').length === 5")
    assert tab.offsets("ann", room) == [1, 2, 3, 4, 5]
    states = [s for s, _ in tab.states("ann")]
    assert states[states.index("reconnecting") :][-1] == "open"
    assert "closed" not in states
    assert any(f["type"] == "ping" for f in tab.sent)  # how the silent cut was noticed
    assert [j["recovered"] for j in tab.log("ann", "joined")] == [True]


@pytest.mark.slow
@pytest.mark.parametrize("event", ["online", "visible"])
def test_reconnects_at_once_when_online_or_visible(
    proxied: tuple[Server, Proxy], new_tab: Callable[[Server], Tab], event: str
) -> None:
    """With the next attempt a minute away, the browser's `online` event (or the tab
    becoming visible) reconnects at once."""
    srv, proxy = proxied
    tab = new_tab(srv)
    tab.make("ann", f"ws://127.0.0.1:{proxy.port}", backoff=[60, 60])
    tab.js("() => clients.ann.connect()")
    tab.js("() => { Math.random = () => 0.99; }")  # the jittered delay: about 59 s
    proxy.cut()
    tab.until_state("ann", "reconnecting", 30_000)
    proxy.restore()
    if event == "online":
        tab.js("() => window.dispatchEvent(new Event('online'))")
    else:
        tab.js(
            """() => { Object.defineProperty(document, "visibilityState", { value: "visible" });
            document.dispatchEvent(new Event("visibilitychange")); }"""
        )
    tab.until_state("ann", "open")


@pytest.mark.slow
def test_slow_consumer_closed_4408_recovers(new_tab: Callable[[Server], Tab]) -> None:
    """The proxy stops reading for the client: its outbox overflows and the server closes it
    with 4408. Reading again, the client sees the close, reconnects and recovers."""
    env = {
        "OUTBOX_SIZE": "16",
        "MAX_TEXT_CHARS": "60000",
        "MAX_MESSAGE_BYTES": "61000",
        "RATE_LIMIT": "100000",
    }
    srv = start_server(env)
    proxy = Proxy(srv.port)
    try:
        tab = new_tab(srv)
        room = _room()
        tab.make("slow", f"ws://127.0.0.1:{proxy.port}", username="slow", backoff=[0.2, 1])
        tab.make("fast", srv.ws, username="fast", client="fast-" + uuid.uuid4().hex[:8])
        for name in ("slow", "fast"):
            tab.js("([n, r]) => enter(n, r)", [name, room])
        proxy.pause_reading()
        # Random text (60,000 base64 characters each): compression cannot shrink it.
        tab.js(
            """async (r) => {
                const bytes = () => crypto.getRandomValues(new Uint8Array(45000));
                const text = () => btoa(String.fromCharCode(...bytes()));
                for (let i = 0; i < 200; i++) await clients.fast.send(r, text());
            }""",
            room,
        )
        deadline = time.monotonic() + 20
        while _slow_consumers(srv) < 1:  # polled, under a deadline
            assert time.monotonic() < deadline, "the server never closed the client with 4408"
            time.sleep(0.1)
        proxy.resume_reading()
        tab.until("() => logs.slow.filter((e) => e.kind === 'chat').length === 200", timeout=60_000)
        assert tab.offsets("slow", room) == list(range(1, 201))
        assert ("reconnecting", 4408) in tab.states("slow")
        assert tab.states("slow")[-1] == ("open", None)
        assert tab.log("slow", "recoveryFailed") == []
    finally:
        proxy.close()
        srv.terminate()


def _slow_consumers(server: Server) -> float:
    with urllib.request.urlopen(server.http + "/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.search(r"^roomcast_slow_consumers_total ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def _token(sub: str, ttl: float) -> str:
    return jwt.encode(
        {"sub": sub, "name": sub.title(), "exp": int(time.time() + ttl)}, SECRET, algorithm="HS256"
    )


@pytest.fixture(scope="module")
def secured() -> Iterator[Server]:
    port = free_port()
    env = {
        "JWT_SECRET": SECRET,
        "API_KEY": API_KEY,
        "ALLOWED_ORIGINS": f"http://127.0.0.1:{port}",
    }
    srv = start_server(env, ["--port", str(port)])
    yield srv
    srv.terminate()


@pytest.mark.slow
def test_token_refreshed_before_exp_and_after_4401(
    secured: Server, new_tab: Callable[[Server], Tab]
) -> None:
    tab = new_tab(secured)
    minted: list[str] = []

    def mint() -> str:
        minted.append(_token("ann", 3600))
        return minted[-1]

    tab.page.expose_function("mintToken", mint)
    short = _token("ann", 6)
    tab.make("ann", secured.ws, token=short, refresh=True)
    room = _room()
    tab.js("r => enter('ann', r)", room)
    expires = jwt.decode(short, options={"verify_signature": False})["exp"]
    tab.until(f"() => Date.now() > {(expires + 1) * 1000}", timeout=20_000)
    assert tab.js("([r, t]) => clients.ann.send(r, t)", [room, "past exp"])["offset"] == 1
    assert [f["token"] for f in tab.sent if f["type"] == "refresh"] == minted[:1]
    assert len(tab.sockets) == 1 and tab.js("clients.ann.state") == "open"
    assert all("token" not in ws.url for ws in tab.sockets)

    # The application disconnects the user (4401): a new token, and back.
    status, body = http(
        secured,
        "POST",
        "/api/users/ann/disconnect",
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert (status, body) == (200, {"disconnected": 1})
    tab.until("() => logs.ann.some((e) => e.state === 'reconnecting' && e.code === 4401)")
    tab.until_state("ann", "open")
    assert len(minted) == 2 and len(tab.sockets) == 2
    assert tab.js("([r, t]) => clients.ann.send(r, t)", [room, "back"])["offset"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("case", ["4403 origin", "4401 without tokenRefresh"])
def test_final_closes_reject_pending_and_end_in_closed(
    secured: Server, new_tab: Callable[[Server], Tab], case: str
) -> None:
    tab = new_tab(secured)
    if case == "4403 origin":
        # `localhost` reaches the same server but is not the allowed origin.
        tab.page.goto(f"http://localhost:{secured.port}/healthz")
        tab.js(HARNESS, f"http://localhost:{secured.port}")
        tab.make("ann", secured.ws, token=_token("ann", 3600))
        expected = ("origin_not_allowed", 4403)
    else:
        tab.make("ann", secured.ws, token=_token("ann", -60))
        expected = ("unauthorized", 4401)
    outcome = tab.js(
        """async () => {
            const welcome = settle(clients.ann.connect());
            const join = settle(clients.ann.join("team"));
            return [await welcome, await join];
        }"""
    )
    for settled in outcome:
        assert (settled["error"], settled["closeCode"]) == expected, settled
    assert tab.states("ann") == [("connecting", None), ("closed", expected[1])]
    assert len(tab.sockets) == 1
    again = tab.js("settle(clients.ann.send('team', 'x'))")
    assert again["error"] == "closed"


@pytest.mark.slow
def test_heartbeat_pings_after_silence_and_reconnects_without_pong(
    web: Server, new_tab: Callable[[Server], Tab]
) -> None:
    """A mock server with heartbeat 1 s: the client pings only when it hears nothing,
    stays while pongs come back, and reconnects once they stop."""
    tab = new_tab(web)
    pings: list[int] = []
    connections: list[int] = []

    def mock(ws: WebSocketRoute) -> None:
        number = len(connections) + 1
        connections.append(number)

        def on_message(message: str | bytes) -> None:
            frame = json.loads(message)
            if frame.get("type") == "ping":
                pings.append(number)
                if number == 1 and len(pings) <= 2:  # then silence
                    ws.send(json.dumps({"type": "pong", "ref": frame["ref"]}))

        ws.on_message(on_message)
        user = {"id": "mock", "name": f"mock{number}"}
        welcome = {"type": "welcome", "conn": "c", "user": user, "protocol": 1, "heartbeat": 1}
        ws.send(json.dumps(welcome))

    tab.page.route_web_socket(re.compile(r"/ws\?"), mock)
    tab.make("ann", web.ws, backoff=[0.1, 0.2])
    tab.js("() => clients.ann.connect()")
    tab.until("() => clients.ann.welcome && clients.ann.welcome.user.name === 'mock2'")
    # Two pongs kept the first connection; the third ping went unanswered.
    assert pings[:3] == [1, 1, 1], pings
    assert [s for s, _ in tab.states("ann")] == ["connecting", "open", "reconnecting", "open"]
    assert tab.log("ann", "pong") == []  # the heartbeat's own pongs are not emitted
