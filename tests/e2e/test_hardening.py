"""Issue 14's attacks on a real `roomcast serve`, each shown to fail.

Memory floods through the history, reconnect churn, deeply nested JSON,
spoofed forwarding headers, borrowed anonymous identities, unsafe settings,
and the smaller leaks (/healthz counts, tracebacks on a closed pipe, origins
with userinfo or a path). Half-finished handshakes are in test_handshakes.py.
Every probe is bounded in count and time and talks to loopback only.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import connect
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed

from ..attacks import (
    ATTACKER,
    Counting,
    Sampler,
    churn,
    flood,
    metric,
    replayed,
    rss_mib,
    ws_connect,
)
from ..servers import Server, start_server
from ..support import TIMEOUT, client, http, room_client
from .test_cli import clean_env, run_serve

BUDGET_MIB = 8
# What the process holds beside the history: the flood's connections and buffers,
# and the heap's slack.
MARGIN_MIB = 16


def fresh(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns()}"


def refusals(server: Server, reason: str) -> float:
    return metric(server, f'roomcast_refused_connections_total{{reason="{reason}"}}')


# --- 1. memory: HISTORY_MEMORY_MB and the HISTORY_TTL sweep -------------------------


@pytest.mark.slow
async def test_a_chat_flood_stays_within_history_memory_mb_and_leaves_nothing() -> None:
    """10 anonymous clients chat 4,000-character texts under RATE_LIMIT for 30 s
    (about 90 MB of history without a bound): RSS stays within the budget plus a
    margin, and a TTL after they left it is back at its baseline, with nothing to
    replay."""
    ttl = 6
    server = start_server(
        {"HISTORY_MEMORY_MB": str(BUDGET_MIB), "HISTORY_TTL": str(ttl), "CONNECT_RATE": "20"}
    )
    try:
        pid = server.process.pid
        assert await replayed(server, "warm-up") == 0  # the code paths are loaded
        baseline = rss_mib(pid)
        async with Sampler(lambda: rss_mib(pid)).running() as rss:
            acked = await flood(server, 30)
        assert acked > 4000  # the flood went through: the server stored it, then let go
        assert rss.peak <= baseline + BUDGET_MIB + MARGIN_MIB, (baseline, rss.peak)
        assert 0 < metric(server, "roomcast_history_memory_bytes") <= BUDGET_MIB * 2**20
        # Everyone left: polled until the sweep has let go of every room, within a
        # TTL, the sweep's period and a margin.
        deadline = time.monotonic() + ttl * 1.5 + 10
        while metric(server, "roomcast_history_memory_bytes") > 0:
            assert time.monotonic() < deadline, "the history was never swept"
            await asyncio.sleep(0.2)
        assert rss_mib(pid) <= baseline + 4, (baseline, rss_mib(pid))
        assert await replayed(server, "flood-0-0") == 0
    finally:
        server.terminate()


# --- 3. reconnect churn: CONNECT_RATE ---------------------------------------------------


async def test_reconnect_churn_barely_reaches_the_members() -> None:
    """50 members in a room; another machine connects and closes 200 times without a
    frame. Without a limit each member got 400 `system` frames; CONNECT_RATE (20 per
    second, burst 40) refuses the excess with `too_many_connections` and 4429."""
    server = start_server({"CONNECT_RATE": "20"})
    try:
        sockets = [  # from two addresses, each within the burst
            await ws_connect(server, "/ws/churn", f"127.0.0.{1 + index % 2 * 2}")
            for index in range(50)
        ]
        members = Counting(sockets)
        try:
            before = await members.quiet()
            started = time.monotonic()
            answers = await churn(server, "churn", 200)
            elapsed = time.monotonic() - started
            after = await members.quiet()
        finally:
            await members.close()
        admitted, refused = answers.get("welcome", 0), answers.get("too_many_connections", 0)
        assert admitted + refused == 200, answers
        assert admitted <= 40 + 20 * elapsed + 1, (answers, elapsed)
        got = {a - b for a, b in zip(after, before, strict=True)}
        assert got == {2 * admitted}, got  # a `system` join and leave per admitted one
        assert refusals(server, "connect_rate") == refused

        async with client(server) as own:  # another address is not limited
            await own.ping()
        # A refused connection: the error, then 4429, and no welcome.
        for _ in range(100):  # the bucket has refilled a little since: empty it again
            ws = await ws_connect(server, "/ws", ATTACKER)
            first = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
            if first["type"] == "error":
                break
            await ws.close()
        assert (first["type"], first["code"]) == ("error", "too_many_connections"), first
        assert "CONNECT_RATE" in first["detail"]
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4429
    finally:
        server.terminate()


# --- 4. deeply nested and very wide JSON --------------------------------------------


@pytest.fixture(scope="module")
def api_server() -> Iterator[Server]:
    srv = start_server({"API_KEY": "k" * 16, "PYTHONUNBUFFERED": "1"})
    yield srv
    srv.terminate()


DEEP = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize(
    "frame",
    [
        '{"type": "chat", "room": "a", "text": "x", "extra": ' + DEEP + "}",
        '{"ref": "r1", "type": "chat", "x": ' + "[" * 30000,
        '{"type": "join", "room": "a", "since": ' + '{"a": ' * 10000,
        '{"type": "ping", "ref": "p", "x": ' + '[{"y": ' * 5000 + "1" + "}]" * 5000 + "}",
    ],
    ids=["deep-field", "deep-unclosed", "deep-objects", "deep-mixed"],
)
async def test_deeply_nested_json_is_an_invalid_message(api_server: Server, frame: str) -> None:
    async with client(api_server) as c:
        await c.send(frame)
        error = await c.recv_type("error", code="invalid_message")
        assert "nests too deeply" in error["detail"]
        await c.ping()  # the connection is kept
    async with room_client(api_server, fresh("deep")) as c:  # where text can be a chat
        await c.send(frame)
        await c.recv_type("error", code="invalid_message")
        await c.ping()
    assert "Traceback" not in api_server.log()


async def test_very_wide_json_is_answered_as_any_frame(api_server: Server) -> None:
    room = fresh("wide")
    wide: dict[str, object] = {"type": "chat", "room": room, "text": "wide", "ref": "w"}
    wide.update({f"k{i}": i for i in range(4000)})  # unknown fields are ignored
    async with room_client(api_server, room) as c:
        await c.send(wide)
        await c.ack_and_chat("wide", "w")
        await c.send({"type": "join", "room": [0] * 20000, "ref": "j"})
        await c.recv_type("error", code="invalid_message", ref="j")
        await c.ping()


def test_deeply_nested_json_is_a_422_on_the_http_api(api_server: Server) -> None:
    auth = {"Authorization": "Bearer " + "k" * 16, "Content-Type": "application/json"}
    deep_data = '{"type": "notification", "title": "t", "body": "b", "data": ' + DEEP + "}"
    for path, body in [
        ("/api/rooms/lobby/publish", deep_data),
        ("/api/users/u/notify", deep_data),
        ("/api/rooms/lobby/publish", deep_data[: deep_data.index("[")] + "[" * 40000),
    ]:
        status, answer = http(api_server, "POST", path, headers=auth, raw=body.encode())
        assert (status, answer["error"]) == (422, "invalid_body"), answer
        assert "nests too deeply" in answer["detail"]
    wide = '{"type": "notification", "title": "t", "body": "b", "data": [' + "0," * 20000 + "0]}"
    status, answer = http(
        api_server, "POST", "/api/rooms/lobby/publish", headers=auth, raw=wide.encode()
    )
    assert status == 200, answer
    assert "Traceback" not in api_server.log()


# --- 5. forwarded headers from untrusted peers ----------------------------------------


async def test_a_spoofed_x_forwarded_for_is_ignored_from_an_untrusted_peer() -> None:
    """FORWARDED_ALLOW_IPS (default 127.0.0.1): another address cannot pose as many
    clients to get around CONNECT_RATE, nor put another address in the logs."""
    server = start_server({"CONNECT_RATE": "2", "PYTHONUNBUFFERED": "1"})  # burst 4
    try:
        codes = []
        for index in range(8):
            async with asyncio.timeout(TIMEOUT):
                ws = await connect(
                    server.ws + "/ws",
                    local_addr=(ATTACKER, 0),
                    additional_headers=Headers({"X-Forwarded-For": f"203.0.113.{index}"}),
                )
                codes.append(json.loads(await ws.recv())["type"])
                await ws.close()
        assert codes[:4] == ["welcome"] * 4 and "error" in codes[4:], codes
        assert "203.0.113." not in server.log()
        assert f"{ATTACKER}:" in server.log()

        # From the trusted proxy (loopback), the forwarded address is the client's.
        async with asyncio.timeout(TIMEOUT):
            ws = await connect(
                server.ws + "/ws",
                additional_headers=Headers({"X-Forwarded-For": "198.51.100.7"}),
            )
            assert json.loads(await ws.recv())["type"] == "welcome"
            await ws.close()
        await asyncio.sleep(0.2)  # the access log line is written after the close
        assert "198.51.100.7:" in server.log()
    finally:
        server.terminate()


def test_forwarded_allow_ips_must_be_addresses_or_networks() -> None:
    outcome = run_serve(["--port", "0"], clean_env(FORWARDED_ALLOW_IPS="127.0.0.1,proxy.local"))
    assert outcome.returncode == 2, outcome.output
    assert "FORWARDED_ALLOW_IPS" in outcome.output and "'proxy.local'" in outcome.output


# --- 6. anonymous identities ----------------------------------------------------------


def public_id(client_id: str) -> str:
    return "anon-" + hashlib.sha256(client_id.encode()).hexdigest()[:20]


async def test_a_public_id_does_not_let_anyone_connect_as_that_user(server: Server) -> None:
    room = fresh("imp")
    secret = fresh("alice-secret")
    alice_id = public_id(secret)
    async with room_client(server, room, client=secret, username="Alice") as alice:
        assert alice.user == {"id": alice_id, "name": "Alice"}
        async with room_client(server, room, client=fresh("bob")) as bob:
            assert alice_id in [u["id"] for u in bob.joined["presence"]]
            await alice.recv_type("system", event="join", user=bob.user)
            # Mallory read Alice's id in presence and connects with it as her `client`.
            async with room_client(server, room, client=alice_id, username="Alice") as mallory:
                assert mallory.user["id"] != alice_id and mallory.user["name"] == "Alice"
                for other in (alice, bob):  # announced as somebody new
                    await other.recv_type("system", event="join", user=mallory.user, online=3)
                _, own = await mallory.chat("it is me, Alice")
                assert own["user"]["id"] == mallory.user["id"]
                for other in (alice, bob):
                    seen = await other.recv_type("chat", text="it is me, Alice")
                    assert seen["user"]["id"] != alice_id
    # Stable across reconnects: the same secret, the same public id.
    async with client(server, client=secret) as again:
        assert again.user["id"] == alice_id
    # Nor is the secret in the log of the handshakes (uvicorn writes it at once, to stderr).
    assert secret not in server.log() and "client=[redacted]" in server.log()
    async with client(server) as nobody, client(server, client="bad client!") as invalid:
        for anonymous in (nobody, invalid):  # random, per connection
            assert anonymous.user["id"].startswith("anon-") and len(anonymous.user["id"]) == 25


# --- 7. unsafe settings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "variable", "why"),
    [
        ({"JWT_SECRET": "Zq"}, "JWT_SECRET", "2 bytes, and HS256 needs at least 32"),
        ({"JWT_SECRET": "é" * 15}, "JWT_SECRET", "30 bytes"),
        ({"API_KEY": "kQzX"}, "API_KEY", "4 characters; use at least 16"),
        ({"ALLOWED_ORIGINS": "allowed.example"}, "ALLOWED_ORIGINS", "no scheme"),
        ({"ALLOWED_ORIGINS": "https://a.example, https://u@b.example"}, "ALLOWED_ORIGINS", "user"),
        ({"ALLOWED_ORIGINS": "https://a.example/chat"}, "ALLOWED_ORIGINS", "path"),
        ({"ALLOWED_ORIGINS": "https://a.example/"}, "ALLOWED_ORIGINS", "ends in `/`"),
    ],
    ids=["jwt-2-bytes", "jwt-30-bytes", "api-key", "no-scheme", "userinfo", "path", "slash"],
)
def test_unsafe_settings_stop_startup_in_one_line(
    env: dict[str, str], variable: str, why: str
) -> None:
    outcome = run_serve(["--port", "0"], clean_env(**env))
    assert outcome.returncode == 2, outcome.output
    line = outcome.output.strip()
    assert "\n" not in line and line.startswith(f"roomcast: {variable}"), line
    assert why in line
    for value in env.values():  # a secret is never repeated
        if variable in ("JWT_SECRET", "API_KEY"):
            assert value not in line.removeprefix(f"roomcast: {variable}")


def test_the_token_command_needs_a_safe_secret_and_warns_of_nothing() -> None:
    good = subprocess.run(
        [sys.executable, "-m", "roomcast", "token", "--sub", "alice", "--secret", "s" * 32],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
        check=False,
    )
    assert good.returncode == 0 and good.stderr == "", good.stderr
    short = subprocess.run(
        [sys.executable, "-m", "roomcast", "token", "--sub", "alice"],
        capture_output=True,
        text=True,
        env=clean_env(JWT_SECRET="change-me"),
        timeout=30,
        check=False,
    )
    assert short.returncode == 2 and short.stdout == ""
    assert short.stderr.startswith("roomcast: JWT_SECRET is too short: 9 bytes"), short.stderr


# --- 8. what the server reveals, closed pipes, origins ----------------------------------


async def test_healthz_says_only_that_the_process_serves(server: Server) -> None:
    async with client(server), client(server):
        status, body = http(server, "GET", "/healthz")
    assert (status, body) == (200, {"status": "ok"})


def test_a_command_piped_into_a_closed_reader_exits_quietly() -> None:
    for command in ("schema", "--help", "serve --help"):
        shell = f"{sys.executable} -m roomcast {command} | head -c 10"
        result = subprocess.run(
            ["bash", "-o", "pipefail", "-c", shell],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=30,
            check=False,
        )
        assert result.stderr == "", (command, result.stderr)
        assert len(result.stdout) == 10
        assert result.returncode in (0, 141), (command, result.returncode)


@pytest.fixture(scope="module")
def origin_server() -> Iterator[Server]:
    srv = start_server({"ALLOWED_ORIGINS": "https://chat.example"})
    yield srv
    srv.terminate()


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example@chat.example",
        "https://chat.example@evil.example",
        "https://chat.example/path",
        "https://chat.example/",
        "https://chat.example?x=1",
        "https://user:pass@chat.example",
    ],
)
async def test_an_origin_that_is_not_bare_is_refused(origin_server: Server, origin: str) -> None:
    before = refusals(origin_server, "origin")
    async with asyncio.timeout(TIMEOUT):
        ws = await connect(origin_server.ws + "/ws", origin=origin)  # type: ignore[arg-type]
    try:
        first = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert (first["type"], first["code"]) == ("error", "origin_not_allowed"), first
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403
    finally:
        await ws.close()
    assert refusals(origin_server, "origin") == before + 1
    async with asyncio.timeout(TIMEOUT):
        ws = await connect(origin_server.ws + "/ws", origin="https://chat.example")  # type: ignore[arg-type]
    try:
        assert json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["type"] == "welcome"
    finally:
        await ws.close()
