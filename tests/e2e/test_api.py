"""The HTTP API against real servers: statuses and their precedence, publish with
idempotent `ref`, notify/disconnect counted across workers, history, presence,
the `roomcast publish/notify/disconnect` commands, and the API key's compare."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any, TypedDict

import pytest

from roomcast.web.api import KeyCheck
from roomcast.web.auth import mint_token

from ..servers import Server, start_server
from ..support import Client, client, http, room_client
from .test_cli import roomcast
from .test_scaleout import shared_env, two_servers

KEY = "k-roomcast-test-api-key-5f0e3a9c"  # fixed: test ids name it, across test workers
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT = 5.0


class CliEnv(TypedDict, total=False):
    """What the CLI's error cases set in its environment."""

    API_KEY: str


def fresh(prefix: str = "r") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def api(server: Server, method: str, path: str, body: Any = None, **kw: Any) -> Any:
    status, answer = await asyncio.wait_for(
        asyncio.to_thread(http, server, method, path, body, kw.pop("headers", AUTH), **kw),
        TIMEOUT + 1,
    )
    assert status == 200, (status, answer)
    return answer


@pytest.fixture(scope="module")
def api_server() -> Iterator[Server]:
    srv = start_server({"API_KEY": KEY, "HISTORY_SIZE": "50", "OUTBOX_SIZE": "20"})
    yield srv
    srv.terminate()


def note(**fields: Any) -> dict[str, Any]:
    return {"type": "notification", "title": "Deploy", "body": "v2 is live", **fields}


# --- statuses ------------------------------------------------------------------


ROUTES = [
    ("POST", "/api/rooms/lobby/publish"),
    ("POST", "/api/users/bob/notify"),
    ("POST", "/api/users/bob/disconnect"),
    ("GET", "/api/rooms/lobby/history"),
    ("GET", "/api/rooms/lobby/presence"),
    ("GET", "/api/stats"),
    ("GET", "/api/rooms"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_is_404_while_api_key_is_unset(server: Server, method: str, path: str) -> None:
    for headers in ({}, AUTH, {"Authorization": "Bearer "}):
        status, answer = http(server, method, path, note(), headers)
        assert (status, answer["error"]) == (404, "not_found"), answer
        assert "API_KEY" in answer["detail"]


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", f"Basic {KEY}", KEY],
)
def test_every_route_is_401_without_the_right_key(
    api_server: Server, method: str, path: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    # Even a request that would also be a 400 and a 422 is a 401 first.
    status, answer = http(api_server, method, path.replace("lobby", "bad%20room"), None, headers)
    assert (status, answer["error"]) == (401, "unauthorized"), answer
    assert set(answer) == {"error", "detail"}


def test_a_users_jwt_is_not_an_api_key(api_server: Server) -> None:
    token = mint_token(KEY, "b", rooms=["*"], ttl=60)
    status, _ = http(api_server, "GET", "/api/rooms/b/history", None, {"Authorization": token})
    assert status == 401
    status, _ = http(
        api_server, "GET", "/api/rooms/b/history", None, {"Authorization": f"Bearer {token}"}
    )
    assert status == 401


def test_bearer_scheme_is_case_insensitive(api_server: Server) -> None:
    status, _ = http(
        api_server, "GET", "/api/rooms/x/history", None, {"Authorization": f"bearer {KEY}"}
    )
    assert status == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code", "phrase"),
    [
        # 400 wins over 422: the room is checked before the body.
        ("POST", "/api/rooms/bad%20room/publish", "not json", 400, "invalid_room", "1 to 64"),
        ("POST", "/api/rooms/" + "x" * 65 + "/publish", note(), 400, "invalid_room", "invalid"),
        ("GET", "/api/rooms/a%2Fb/history", None, 404, "not_found", "No API route"),
        ("GET", "/api/rooms/lobby/history?since=-1", None, 400, "invalid_query", "since"),
        ("GET", "/api/rooms/lobby/history?limit=0", None, 400, "invalid_query", "limit"),
        ("GET", "/api/rooms/lobby/history?limit=ten", None, 400, "invalid_query", "limit"),
        ("GET", "/api/rooms/bad!/presence", None, 400, "invalid_room", "invalid"),
        ("POST", "/api/rooms/lobby/publish", "not json", 422, "invalid_body", "JSON"),
        ("POST", "/api/rooms/lobby/publish", [], 422, "invalid_body", "object"),
        ("POST", "/api/rooms/lobby/publish", {"title": "t"}, 422, "invalid_body", "`type`"),
        (
            "POST",
            "/api/rooms/lobby/publish",
            {"type": "notification"},
            422,
            "invalid_body",
            "`title`",
        ),
        ("POST", "/api/rooms/lobby/publish", note(level="fatal"), 422, "invalid_body", "level"),
        ("POST", "/api/rooms/lobby/publish", note(ref="r" * 65), 422, "invalid_body", "ref"),
        ("POST", "/api/rooms/lobby/publish", note(tilte="typo"), 422, "invalid_body", "tilte"),
        (
            "POST",
            "/api/rooms/lobby/publish",
            {"type": "chat", "text": "hi"},
            422,
            "invalid_body",
            "`user`",
        ),
        (
            "POST",
            "/api/rooms/lobby/publish",
            {"type": "chat", "text": "hi", "user": {"id": "", "name": "x"}},
            422,
            "invalid_body",
            "user.id",
        ),
        (
            "POST",
            "/api/rooms/lobby/publish",
            {"type": "chat", "text": "x" * 4001, "user": {"id": "u", "name": "U"}},
            422,
            "text_too_long",
            "MAX_TEXT_CHARS",
        ),
        (
            "POST",
            "/api/rooms/lobby/publish",
            note(body="x" * 70000),
            413,
            "too_large",
            "MAX_MESSAGE",
        ),
        ("POST", "/api/users/bob/notify", {"title": "t"}, 422, "invalid_body", "`body`"),
        (
            "POST",
            "/api/users/bob/notify",
            {"type": "chat", "title": "t", "body": "b"},
            422,
            "invalid_body",
            "type",
        ),
        ("GET", "/api/rooms/lobby/publish", None, 405, "method_not_allowed", "GET"),
        ("DELETE", "/api/rooms/lobby/history", None, 405, "method_not_allowed", "DELETE"),
        ("GET", "/api/nowhere", None, 404, "not_found", "/api/nowhere"),
    ],
)
def test_errors_say_what_is_wrong(
    api_server: Server, method: str, path: str, body: Any, status: int, code: str, phrase: str
) -> None:
    raw = body.encode() if isinstance(body, str) else None
    got, answer = http(api_server, method, path, None if raw else body, AUTH, raw=raw)
    assert (got, answer["error"]) == (status, code), answer
    assert phrase in answer["detail"], answer
    assert set(answer) == {"error", "detail"}


# --- publish, history, presence ------------------------------------------------------


async def test_publish_notification_reaches_members_with_the_next_offset(
    api_server: Server,
) -> None:
    room = fresh()
    async with room_client(api_server, room) as ann:
        await ann.chat("before", room=room)
        answer = await api(
            api_server, "POST", f"/api/rooms/{room}/publish", note(level="success", data={"v": 2})
        )
        assert answer == {"room": room, "epoch": ann.joined["epoch"], "offset": 2}
        got = await ann.recv_type("notification", room=room, offset=2, title="Deploy")
        assert (got["level"], got["data"], got["body"]) == ("success", {"v": 2}, "v2 is live")
        assert got["ts"].endswith("Z")


async def test_publish_with_a_repeated_ref_publishes_once(api_server: Server) -> None:
    room = fresh()
    async with room_client(api_server, room) as ann:
        first = await api(api_server, "POST", f"/api/rooms/{room}/publish", note(ref="deploy-7"))
        again = await api(api_server, "POST", f"/api/rooms/{room}/publish", note(ref="deploy-7"))
        assert first == again == {"room": room, "epoch": ann.joined["epoch"], "offset": 1}
        other = await api(api_server, "POST", f"/api/rooms/{room}/publish", note(ref="deploy-8"))
        assert other["offset"] == 2
        # Exactly offsets 1 and 2 arrive: the repeat published nothing.
        assert [f["offset"] for f in await ann.recv_many(2)] == [1, 2]
        history = await api(api_server, "GET", f"/api/rooms/{room}/history")
        assert [m["offset"] for m in history["messages"]] == [1, 2]


async def test_publish_chat_as_a_user_is_sanitized(api_server: Server) -> None:
    room = fresh()
    async with room_client(api_server, room) as ann:
        body = {
            "type": "chat",
            "text": "<b>from the backend</b>",
            "user": {"id": "bot-1", "name": "Bot\x00\x1b" + "x" * 50},
        }
        answer = await api(api_server, "POST", f"/api/rooms/{room}/publish", body)
        chat = await ann.recv_type("chat", offset=answer["offset"], text="<b>from the backend</b>")
        assert chat["user"]["id"] == "bot-1"
        assert chat["user"]["name"].startswith("Bot") and "\x00" not in chat["user"]["name"]
        assert len(chat["user"]["name"]) == 32


async def test_history_since_and_limit(api_server: Server) -> None:
    room = fresh()
    for n in range(5):
        await api(api_server, "POST", f"/api/rooms/{room}/publish", note(title=f"n{n}"))
    page = await api(api_server, "GET", f"/api/rooms/{room}/history?since=2&limit=2")
    assert (page["room"], page["offset"]) == (room, 5)
    assert [(m["offset"], m["title"]) for m in page["messages"]] == [(3, "n2"), (4, "n3")]
    assert {m["epoch"] for m in page["messages"]} == {page["epoch"]}
    everything = await api(api_server, "GET", f"/api/rooms/{room}/history")
    assert [m["offset"] for m in everything["messages"]] == [1, 2, 3, 4, 5]
    # A limit above HISTORY_SIZE (50 here) is capped, not refused.
    capped = await api(api_server, "GET", f"/api/rooms/{room}/history?since=0&limit=100000")
    assert len(capped["messages"]) == 5
    empty = await api(api_server, "GET", f"/api/rooms/{fresh('unknown')}/history?since=3")
    assert (empty["offset"], empty["messages"]) == (0, [])


async def test_history_holds_what_websocket_clients_said(api_server: Server) -> None:
    room = fresh()
    async with room_client(api_server, room, username="Ann") as ann:
        _, chat = await ann.chat("hello <you>")
    page = await api(api_server, "GET", f"/api/rooms/{room}/history")
    assert page["messages"] == [chat]


async def test_presence_lists_the_rooms_users(api_server: Server) -> None:
    room = fresh()
    async with (
        room_client(api_server, room, username="Ann", client="ann-1") as ann,
        room_client(api_server, room, username="Bob", client="bob-1"),
    ):
        await ann.recv_type("system", event="join")
        answer = await api(api_server, "GET", f"/api/rooms/{room}/presence")
        assert answer["room"] == room and answer["online"] == 2
        assert sorted(u["name"] for u in answer["users"]) == ["Ann", "Bob"]
        assert ann.user in answer["users"]
    empty = await api(api_server, "GET", f"/api/rooms/{fresh()}/presence")
    assert (empty["online"], empty["users"]) == (0, [])


async def test_notify_counts_connections_and_disconnect_closes_4401(api_server: Server) -> None:
    secret = fresh("u")
    async with (
        client(api_server, client=secret) as one,
        client(api_server, client=secret) as two,
        client(api_server) as other,
    ):
        user = one.user["id"]  # the public id, the same for both connections
        assert two.user["id"] == user != secret
        answer = await api(
            api_server, "POST", f"/api/users/{user}/notify", {"title": "Hi", "body": "you"}
        )
        assert answer == {"delivered": 2}
        assert await api(
            api_server, "POST", f"/api/users/{secret}/notify", {"title": "x", "body": "y"}
        ) == {"delivered": 0}  # the secret `client` is nobody's id
        for conn in (one, two):
            got = await conn.recv_type("notification", title="Hi", room=None, offset=None)
            assert got["epoch"] is None
        assert await api(
            api_server, "POST", "/api/users/nobody-here/notify", {"title": "x", "body": "y"}
        ) == {"delivered": 0}
        assert await api(api_server, "POST", f"/api/users/{user}/disconnect") == {"disconnected": 2}
        for conn in (one, two):
            (why,) = await conn.expect_close(4401)
            assert (why["type"], why["code"]) == ("error", "unauthorized"), why
            assert "ended this user's connections" in why["detail"]
        await other.ping("still-here")


# --- across workers -----------------------------------------------------------------


@pytest.fixture(params=["redis", "postgres", "kafka"])
def api_pair(request: pytest.FixtureRequest) -> Iterator[tuple[Server, Server]]:
    env = {**shared_env(request, request.param), "API_KEY": KEY}
    with two_servers(env) as servers:
        yield servers


async def test_api_across_two_servers(api_pair: tuple[Server, Server]) -> None:
    one, two = api_pair
    room, secret = fresh(), fresh("u")
    async with (
        client(one, client=secret) as here_a,
        client(one, client=secret) as here_b,
        client(two, client=secret) as there,
        client(two, username="Watcher") as watcher,
    ):
        user = here_a.user["id"]
        assert here_b.user["id"] == there.user["id"] == user  # the same on every server
        await watcher.join(room)
        for conn in (here_a, there):
            await conn.join(room)
        # Presence read on either server lists the users of both.
        for server in (one, two):
            seen = await api(server, "GET", f"/api/rooms/{room}/presence")
            assert seen["online"] == 2, seen
            assert user in {u["id"] for u in seen["users"]}
        # Published on one, delivered on both, stored once.
        answer = await api(one, "POST", f"/api/rooms/{room}/publish", note(ref="x1"))
        for conn in (watcher, here_a, there):
            await drain_to(conn, "notification", answer["offset"])
        assert await api(two, "POST", f"/api/rooms/{room}/publish", note(ref="x1")) == answer
        page = await api(two, "GET", f"/api/rooms/{room}/history")
        assert [m["offset"] for m in page["messages"]] == [answer["offset"]]
        # Notify counts the user's connections on both servers.
        notified = await api(two, "POST", f"/api/users/{user}/notify", {"title": "t", "body": "b"})
        assert notified == {"delivered": 3}
        for conn in (here_a, here_b, there):
            await drain_to(conn, "notification", None)
        assert await api(one, "POST", f"/api/users/{user}/disconnect") == {"disconnected": 3}
        for conn in (here_a, here_b, there):
            await conn.expect_close(4401)
        await watcher.send({"type": "ping", "ref": "alive"})
        await drain_to(watcher, "pong", None)


async def drain_to(conn: Client, kind: str, offset: int | None) -> dict[str, Any]:
    """Skip presence events until the frame of `kind` (with `offset`)."""
    async with asyncio.timeout(10):
        while True:
            frame = await conn.recv(10)
            if frame["type"] == kind and frame.get("offset") == offset:
                return frame
            assert frame["type"] == "system", frame


# --- the command line ---------------------------------------------------------------


async def test_cli_publish_notify_disconnect(api_server: Server) -> None:
    room = fresh()
    async with room_client(api_server, room) as ann, client(api_server, client=fresh("u")) as bob:
        user = bob.user["id"]
        run = await asyncio.to_thread(
            roomcast,
            "publish", room, "--title", "Deploy", "--body", "done", "--level", "warning",
            "--data", '{"build": 7}', "--ref", "b7", "--url", api_server.ws + "/ws",
            API_KEY=KEY,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout) == {"room": room, "epoch": ann.joined["epoch"], "offset": 1}
        got = await ann.recv_type("notification", offset=1, level="warning", data={"build": 7})
        assert got["title"] == "Deploy"
        run = await asyncio.to_thread(
            roomcast,
            "publish", room, "--text", "hi all", "--user-id", "bot", "--user-name", "Bot",
            "--api-key", KEY, ROOMCAST_URL=api_server.http,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        await ann.recv_type("chat", offset=2, text="hi all", user={"id": "bot", "name": "Bot"})
        run = await asyncio.to_thread(
            roomcast, "notify", user, "--title", "Ping", "--body", "b", "--url", api_server.http,
            API_KEY=KEY,
        )  # fmt: skip
        assert (run.returncode, json.loads(run.stdout)) == (0, {"delivered": 1}), run.stderr
        await bob.recv_type("notification", title="Ping", room=None)
        run = await asyncio.to_thread(
            roomcast, "disconnect", user, "--url", api_server.http, API_KEY=KEY
        )
        assert (run.returncode, json.loads(run.stdout)) == (0, {"disconnected": 1}), run.stderr
        await bob.expect_close(4401)


@pytest.mark.parametrize(
    ("args", "env", "phrase", "code"),
    [
        (["notify", "bob", "--title", "t", "--body", "b"], {}, "no API key", 1),
        (
            ["notify", "bob", "--title", "t", "--body", "b"],
            {"API_KEY": "wrong"},
            "401 unauthorized",
            4,
        ),
        (
            ["publish", "bad room", "--title", "t", "--body", "b"],
            {"API_KEY": KEY},
            "400 invalid_room",
            6,
        ),
        (["publish", "lobby", "--title", "t"], {"API_KEY": KEY}, "needs --title and --body", 1),
        (["publish", "lobby", "--text", "hi"], {"API_KEY": KEY}, "--user-id", 1),
        (
            ["publish", "lobby", "--title", "t", "--body", "b", "--data", "{"],
            {"API_KEY": KEY},
            "--data is not JSON",
            1,
        ),
    ],
)
def test_cli_errors_are_one_line(
    api_server: Server, args: list[str], env: CliEnv, phrase: str, code: int
) -> None:
    run = roomcast(*args, "--url", api_server.http, **env)
    assert run.returncode == code, run
    assert phrase in run.stderr and run.stderr.count("\n") == 1, run.stderr
    assert not run.stdout


def test_cli_says_when_the_server_is_down() -> None:
    from ..brokers import free_port

    run = roomcast(
        "notify", "bob", "--title", "t", "--body", "b",
        "--url", f"http://127.0.0.1:{free_port()}", API_KEY=KEY,
    )  # fmt: skip
    assert run.returncode == 3  # as `roomcast send` when the server is down
    assert "cannot reach" in run.stderr and "refused" in run.stderr, run.stderr
    assert run.stderr.count("\n") == 1


# --- the key's comparison --------------------------------------------------------


def test_key_check_takes_as_long_whatever_part_of_the_key_is_right() -> None:
    """No timing difference worth measuring between a key that is wrong in its
    first character, one wrong only in its last, and one wrong throughout.
    (The time may depend on the length of what the caller sends, which it knows
    already; both sides are hashed first, so never on the key's.)

    The harness first proves it can see such a difference: a naive `==` over
    the same (long) keys leaks where they differ. Minimum over many interleaved
    batches, which noise from other processes can only raise.
    """
    key = "k" * 100_000
    candidates = {
        "first": "Bearer x" + key[1:],
        "last": "Bearer " + key[:-1] + "x",
        "all": "Bearer " + "x" * len(key),
    }
    check = KeyCheck(key)

    expected = "Bearer " + key  # built once: the comparison alone is what leaks

    def naive(header: str) -> bool:
        return header == expected

    def fastest(fn: Any, header: str) -> float:
        best = float("inf")
        for _ in range(40):
            started = time.perf_counter()
            for _ in range(20):
                fn(header)
            best = min(best, time.perf_counter() - started)
        return best

    def spread(fn: Any) -> float:
        times = {name: fastest(fn, header) for name, header in candidates.items()}
        for name, header in candidates.items():  # interleaved second pass
            times[name] = min(times[name], fastest(fn, header))
        return max(times.values()) / min(times.values())

    assert spread(naive) > 2.0, "the harness cannot see a timing leak here"
    assert spread(check) < 1.25
    assert check(f"Bearer {key}") and not any(check(h) for h in candidates.values())


def api_counts(server: Server) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(server.http + "/metrics", timeout=TIMEOUT) as response:
        text = response.read().decode()
    found = re.findall(
        r'^roomcast_api_requests_total\{route="(\w+)",status="(\w+)"\} (\S+)$', text, re.M
    )
    return {(route, status): float(value) for route, status, value in found}


def test_api_requests_are_counted_by_route_and_status(api_server: Server) -> None:
    before = api_counts(api_server)
    assert before[("history", "200")] >= 0 and ("other", "other") in before
    http(api_server, "GET", "/api/rooms/m/history", None, AUTH)
    http(api_server, "GET", "/api/rooms/m/history", None, AUTH)
    http(api_server, "POST", "/api/rooms/m/publish", {"type": "nope"}, AUTH)
    http(api_server, "GET", "/api/rooms/m/presence", None, {})
    http(api_server, "GET", "/api/elsewhere", None, AUTH)
    http(api_server, "GET", "/api/stats", None, AUTH)
    http(api_server, "GET", "/api/rooms?limit=0", None, AUTH)
    after = api_counts(api_server)
    changed = {key: after[key] - before[key] for key in after if after[key] != before[key]}
    assert changed == {
        ("history", "200"): 2,
        ("publish", "422"): 1,
        ("presence", "401"): 1,
        ("other", "404"): 1,
        ("stats", "200"): 1,
        ("rooms", "400"): 1,
    }
