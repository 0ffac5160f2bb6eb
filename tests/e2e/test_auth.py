"""Tokens (JWT_SECRET), origins (ALLOWED_ORIGINS) and `roomcast token`.

The pure functions of service/auth.py are tested directly; everything else
against real servers, with tokens minted here with PyJWT. Every failure path
of the protocol's "Identity", "Order of frames" (point 3) and "Closing" (4401,
4403) is covered, and a token for rooms `a*` is shown unable to read room `b`
by any route.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.typing import Origin, Subprotocol

from roomcast.observe.logs import RedactTokens, redact_tokens
from roomcast.protocol.envelopes import User
from roomcast.web.auth import (
    MISSING_TOKEN,
    Unauthorized,
    glob_match,
    is_room_pattern,
    mint_token,
    origin_allowed,
    room_permitted,
    token_from,
    verify_token,
)

from ..servers import Server, start_server
from ..support import SUBPROTOCOL, TIMEOUT, Client, Message, client, get, validator, ws_url

REPO = Path(__file__).resolve().parent.parent.parent
SECRET = "test-secret-" + "x" * 60  # 64+ bytes: PyJWT warns about keys shorter than the hash
OTHER_SECRET = "other-secret-" + "y" * 60
ALLOWED = "https://chat.example, http://localhost:8080"
TOKEN_PREFIX = "roomcast.token."


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def token(
    sub: str | None = "alice",
    *,
    secret: str = SECRET,
    algorithm: str = "HS256",
    ttl: float | None = 3600,
    exp: int | None = None,
    **claims: Any,
) -> str:
    """A token minted here with PyJWT, independently of service.auth.mint_token."""
    payload: dict[str, Any] = dict(claims)
    if sub is not None:
        payload["sub"] = sub
    if exp is not None:
        payload["exp"] = exp
    elif ttl is not None:
        payload["exp"] = int(time.time() + ttl)
    return jwt.encode(payload, secret, algorithm=algorithm)


def _serve(env: dict[str, str]) -> Iterator[Server]:
    srv = start_server(env)
    yield srv
    srv.terminate()


@pytest.fixture(scope="module")
def jwt_server() -> Iterator[Server]:
    # Unbuffered, so that the access log (stdout) is in the log file at once.
    yield from _serve(
        {
            "JWT_SECRET": SECRET,
            "ALLOWED_ORIGINS": ALLOWED,
            "MAX_NAME_CHARS": "8",
            "PYTHONUNBUFFERED": "1",
        }
    )


@pytest.fixture(scope="module")
def origin_server() -> Iterator[Server]:
    yield from _serve({"ALLOWED_ORIGINS": ALLOWED})


@asynccontextmanager
async def browser(
    server: Server,
    path: str = "/ws",
    *,
    origin: str | None,
    subprotocols: Sequence[str] = (SUBPROTOCOL,),
    **query: str | None,
) -> AsyncIterator[Client]:
    """Like support.client (welcome not read), sending an `Origin` header as a browser does."""
    async with asyncio.timeout(TIMEOUT + 1):
        ws = await connect(
            ws_url(server, path, **query),
            origin=Origin(origin) if origin is not None else None,
            subprotocols=[Subprotocol(s) for s in subprotocols],
            open_timeout=TIMEOUT,
            close_timeout=TIMEOUT,
            ping_interval=None,
        )
    try:
        yield Client(ws, validator(server))
    finally:
        async with asyncio.timeout(TIMEOUT + 1):
            await ws.close()


async def refused(conn: Client, code: int, error: str) -> Message:
    """The connection was refused: one `error` (no welcome), then the close `code`."""
    frames = await conn.expect_close(code)
    assert len(frames) == 1, frames
    assert frames[0]["type"] == "error" and frames[0]["code"] == error, frames
    assert frames[0]["detail"], frames
    return frames[0]


async def silent_until(conn: Client, wall_time: float) -> None:
    """No frame and no close arrive before `wall_time` (time.time())."""
    left = wall_time - time.time()
    if left > 0:
        with pytest.raises(AssertionError, match="no frame within"):
            await conn.recv(within=left)


# --- service.auth, pure ---------------------------------------------------------


def test_verify_token_user_rooms_expiry() -> None:
    exp = int(time.time()) + 600
    grant = verify_token(
        token("u-1", name="Ünïcode Name", rooms=["lobby", "team-*"], exp=exp), SECRET, 32
    )
    assert grant.user == User("u-1", "Ünïcode Name")
    assert grant.rooms == ("lobby", "team-*")
    assert grant.expires == exp
    assert grant.permits("lobby") and grant.permits("team-x") and grant.permits("team-")
    assert not grant.permits("lobby2") and not grant.permits("Team-x")


def test_verify_token_defaults_name_rooms_expiry() -> None:
    grant = verify_token(token("someone-with-a-long-id", ttl=None), SECRET, 8)
    assert grant.user == User("someone-with-a-long-id", "someone-")  # name: sub, cut
    assert grant.rooms is None and grant.permits("anything")
    assert grant.expires is None


def test_verify_token_name_sanitized_and_cut() -> None:
    grant = verify_token(token("bob", name="\u202eBob\u200b the builder"), SECRET, 8)
    assert grant.user.name == "Bob the"


def _failures() -> list[tuple[str, Callable[[], str | None], str]]:
    """(case, token factory, a phrase of the detail)."""
    return [
        ("missing", lambda: None, "needs a token"),
        ("empty", lambda: "", "needs a token"),
        ("bad signature", lambda: token(secret=OTHER_SECRET), "signature"),
        ("tampered", lambda: _tampered(token("mallory")), "signature"),
        ("malformed", lambda: "not-a-jwt", "not a valid JWT"),
        ("malformed segments", lambda: "a.b.c", "not a valid JWT"),
        ("expired", lambda: token(exp=int(time.time()) - 30), "expired"),
        ("no sub", lambda: token(None, name="Nobody"), "`sub`"),
        ("sub not a string", lambda: _int_sub(), "sub"),
        ("blank sub", lambda: token("   "), "`sub`"),
        ("control chars in sub", lambda: token("a\nb"), "`sub`"),
        ("alg none", lambda: jwt.encode({"sub": "x"}, None, algorithm="none"), "HS256"),
        ("HS512", lambda: token(algorithm="HS512"), "HS256"),
        ("not yet valid", lambda: token(nbf=int(time.time()) + 600), "not valid yet"),
        ("name not a string", lambda: token(name=["A"]), "`name`"),
        ("rooms not a list", lambda: token(rooms="lobby"), "`rooms`"),
        ("rooms not strings", lambda: token(rooms=["lobby", 3]), "`rooms`"),
        ("exp not a number", lambda: _bad_exp(), "exp"),
    ]


def _tampered(good: str) -> str:
    header, _payload, signature = good.split(".")
    forged = jwt.utils.base64url_encode(b'{"sub":"admin","exp":9999999999}').decode()
    return f"{header}.{forged}.{signature}"


def _int_sub() -> str:
    return jwt.encode({"sub": 1, "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")


def _bad_exp() -> str:
    return jwt.encode({"sub": "x", "exp": "soon"}, SECRET, algorithm="HS256")


FAILURES = _failures()


@pytest.mark.parametrize(("case", "make", "phrase"), FAILURES, ids=[f[0] for f in FAILURES])
def test_verify_token_refusals(case: str, make: Callable[[], str | None], phrase: str) -> None:
    raw = make()
    with pytest.raises(Unauthorized) as caught:
        verify_token(raw, SECRET, 32)
    assert phrase in caught.value.detail, caught.value.detail
    if raw:
        assert raw not in caught.value.detail


def test_token_from_prefers_subprotocol() -> None:
    assert token_from(None, []) is None
    assert token_from("", [SUBPROTOCOL]) is None
    assert token_from("q", [SUBPROTOCOL]) == "q"
    assert token_from("q", [SUBPROTOCOL, TOKEN_PREFIX + "s", TOKEN_PREFIX + "t"]) == "s"
    assert token_from(None, [TOKEN_PREFIX]) is None


def test_mint_token_round_trip() -> None:
    raw = mint_token(SECRET, "dana", name="Dana", rooms=["a*"], ttl=60, now=time.time())
    grant = verify_token(raw, SECRET, 32)
    assert grant.user == User("dana", "Dana") and grant.rooms == ("a*",)
    assert grant.expires is not None and 55 <= grant.expires - time.time() <= 61
    claims = jwt.decode(raw, SECRET, algorithms=["HS256"])
    assert set(claims) == {"sub", "name", "rooms", "iat", "exp"}


def test_glob_only_star_is_special() -> None:
    assert glob_match("*", "anything") and glob_match("*", "")
    assert glob_match("a*", "a") and glob_match("a*", "a1") and not glob_match("a*", "ba")
    assert glob_match("*-x", "team-x") and not glob_match("*-x", "team-xy")
    assert glob_match("a*b*c", "aXbYc") and not glob_match("a*b*c", "aXbY")
    assert glob_match("lobby", "lobby") and not glob_match("lobby", "Lobby")
    # fnmatch would treat these as wildcards / sets; here they are literal.
    assert not glob_match("a?", "ab") and glob_match("a?", "a?")
    assert not glob_match("[ab]", "a") and glob_match("[ab]", "[ab]")
    assert not glob_match("a.b", "aXb")  # no regex either


def test_glob_many_stars_is_fast() -> None:
    started = time.monotonic()
    assert not glob_match("*a" * 30 + "*b", "a" * 64)
    assert time.monotonic() - started < 0.5


@settings(max_examples=500, deadline=None)
@given(st.text("ab-*", max_size=8), st.text("ab-", max_size=10))
def test_glob_agrees_with_fnmatchcase_on_star_patterns(pattern: str, name: str) -> None:
    assert glob_match(pattern, name) == fnmatch.fnmatchcase(name, pattern)


def test_room_permitted() -> None:
    assert room_permitted("b", None)
    assert not room_permitted("b", ())
    assert room_permitted("a1", ("x", "a*")) and not room_permitted("b", ("x", "a*"))


def test_is_room_pattern() -> None:
    assert is_room_pattern("team-*") and is_room_pattern("*") and is_room_pattern("a.b:c_d")
    assert not is_room_pattern("") and not is_room_pattern("a?") and not is_room_pattern("[a]")
    assert not is_room_pattern("a b") and not is_room_pattern("x" * 65)


def test_origin_allowed() -> None:
    allowed = ("https://chat.example", "http://localhost:8080")
    assert origin_allowed(None, allowed)  # not a browser
    assert origin_allowed("https://evil.example", ())  # ALLOWED_ORIGINS unset
    assert origin_allowed("https://chat.example", allowed)
    assert origin_allowed("HTTPS://Chat.Example", allowed)
    assert origin_allowed("https://chat.example:443", allowed)
    assert origin_allowed("http://localhost:8080", allowed)
    assert not origin_allowed("http://chat.example", allowed)  # another scheme
    assert not origin_allowed("https://chat.example:8443", allowed)
    assert not origin_allowed("https://chat.example.evil.example", allowed)
    assert not origin_allowed("https://evilchat.example", allowed)
    assert not origin_allowed("http://localhost:8081", allowed)
    assert not origin_allowed("null", allowed)
    assert not origin_allowed("", allowed)
    assert not origin_allowed("https://chat.example:notaport", allowed)
    # Only a bare origin matches: no user information, no path (not even `/`).
    assert not origin_allowed("https://chat.example/", allowed)
    assert not origin_allowed("https://chat.example/chat", allowed)
    assert not origin_allowed("https://evil.example@chat.example", allowed)
    assert not origin_allowed("https://chat.example@evil.example", allowed)
    assert not origin_allowed("https://chat.example?x", allowed)
    assert origin_allowed("https://anything.example", ("*",))


def test_redact_tokens() -> None:
    line = '127.0.0.1:5 - "WebSocket /ws/lobby?username=a&token=eyJ.abc.def&x=1" [accepted]'
    assert redact_tokens(line) == (
        '127.0.0.1:5 - "WebSocket /ws/lobby?username=a&token=[redacted]&x=1" [accepted]'
    )
    assert redact_tokens("/ws?token=a.b.c") == "/ws?token=[redacted]"
    assert redact_tokens("/ws?tok%65n=a.b.c") == "/ws?tok%65n=[redacted]"  # Starlette decodes keys
    assert redact_tokens("/ws?mytoken=keep&tokens=keep") == "/ws?mytoken=keep&tokens=keep"
    assert redact_tokens("no query") == "no query"
    # An anonymous client's `client` id is a secret too: it makes the user.
    assert redact_tokens("/ws?client=s3cret&username=ann") == "/ws?client=[redacted]&username=ann"


def test_redact_filter_on_records() -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("1.2.3.4:5", "GET", "/?token=s3cr3t", "1.1", 200), None,
    )  # fmt: skip
    assert RedactTokens().filter(record)
    assert "s3cr3t" not in record.getMessage()
    assert record.args == ("1.2.3.4:5", "GET", "/?token=[redacted]", "1.1", 200)
    record = logging.LogRecord(
        "uvicorn.error", logging.INFO, __file__, 1, "GET /ws?token=s3cr3t", None, None
    )
    assert RedactTokens().filter(record)
    assert record.getMessage() == "GET /ws?token=[redacted]"


# --- connecting with a token ------------------------------------------------------


@pytest.mark.parametrize(("case", "make", "phrase"), FAILURES, ids=[f[0] for f in FAILURES])
async def test_connect_refused_4401(
    jwt_server: Server, case: str, make: Callable[[], str | None], phrase: str
) -> None:
    raw = make()
    async with client(jwt_server, welcome=False, token=raw) as c:
        error = await refused(c, 4401, "unauthorized")
        assert phrase in error["detail"], error
        assert c.subprotocol == SUBPROTOCOL


async def test_connect_refused_4401_by_subprotocol_token(jwt_server: Server) -> None:
    bad = token(secret=OTHER_SECRET)
    async with client(
        jwt_server, welcome=False, subprotocols=[SUBPROTOCOL, TOKEN_PREFIX + bad]
    ) as c:
        await refused(c, 4401, "unauthorized")
        assert c.subprotocol == SUBPROTOCOL


async def test_connect_refused_on_room_path_gets_no_join(jwt_server: Server) -> None:
    room = fresh("a")
    for raw in (None, token(exp=int(time.time()) - 5)):
        async with client(jwt_server, f"/ws/{room}", welcome=False, token=raw) as c:
            error = await refused(c, 4401, "unauthorized")
            assert error.get("room") is None
    assert error["detail"] != MISSING_TOKEN


async def test_token_in_query_makes_the_user(jwt_server: Server) -> None:
    async with client(jwt_server, token=token("u-alice", name="Alice")) as c:
        assert c.user == {"id": "u-alice", "name": "Alice"}
        room = fresh("lobby")
        joined = await c.join(room, ref="j")
        assert joined["presence"] == [{"id": "u-alice", "name": "Alice"}]
        _, own = await c.chat("hi", room=room)
        assert own["user"] == {"id": "u-alice", "name": "Alice"}


async def test_token_name_defaults_to_sub_and_is_cut(jwt_server: Server) -> None:
    async with client(jwt_server, token=token("bob")) as c:
        assert c.user == {"id": "bob", "name": "bob"}
    async with client(jwt_server, token=token("carol", name="Caroline Long-Name")) as c:
        assert c.user == {"id": "carol", "name": "Caroline"}  # MAX_NAME_CHARS=8


async def test_token_ignores_anonymous_parameters(jwt_server: Server) -> None:
    async with client(
        jwt_server, token=token("eve", name="Eve"), username="Admin", client="x"
    ) as c:
        assert c.user == {"id": "eve", "name": "Eve"}


async def test_token_without_exp_connects(jwt_server: Server) -> None:
    async with client(jwt_server, token=token("no-exp", ttl=None)) as c:
        await c.ping()


async def test_token_by_subprotocol_is_not_echoed(jwt_server: Server) -> None:
    raw = token("sp-user", name="Sub Proto")
    async with client(jwt_server, subprotocols=[SUBPROTOCOL, TOKEN_PREFIX + raw]) as c:
        assert c.subprotocol == SUBPROTOCOL
        assert c.user == {"id": "sp-user", "name": "Sub Prot"}
        await c.ping()
        response = c.ws.response
        assert response is not None
        assert raw not in str(response.headers)
    # Offered alone, no subprotocol is selected (never the token's).
    async with client(jwt_server, subprotocols=[TOKEN_PREFIX + raw]) as c:
        assert c.subprotocol is None
        assert c.user["id"] == "sp-user"


async def test_subprotocol_token_wins_over_query(jwt_server: Server) -> None:
    in_protocol = token("from-protocol")
    async with client(
        jwt_server,
        subprotocols=[SUBPROTOCOL, TOKEN_PREFIX + in_protocol],
        token=token("from-query"),
    ) as c:
        assert c.user["id"] == "from-protocol"


# --- expiry and refresh -------------------------------------------------------------


async def test_expiry_while_connected_closes_4401(jwt_server: Server) -> None:
    exp = int(time.time()) + 2
    room = fresh("exp")
    async with client(jwt_server, token=token("short", exp=exp)) as c:
        await c.join(room)
        frames = await c.expect_close(4401, within=exp - time.time() + 3)
        assert time.time() >= exp - 0.05
        assert [f["type"] for f in frames] == ["error"], frames
        assert frames[0]["code"] == "unauthorized" and "expired" in frames[0]["detail"]


async def test_refresh_extends_then_new_exp_is_honoured(jwt_server: Server) -> None:
    first = int(time.time()) + 2
    second = first + 2
    async with client(jwt_server, token=token("refresher", exp=first)) as c:
        await c.send({"type": "refresh", "token": token("refresher", exp=second), "ref": "r1"})
        await silent_until(c, first + 0.5)  # no answer, no error, no close past the first exp
        await c.ping()
        frames = await c.expect_close(4401, within=second - time.time() + 3)
        assert time.time() >= second - 0.05
        assert [(f["type"], f["code"]) for f in frames] == [("error", "unauthorized")]


async def test_refresh_without_exp_stops_the_timer(jwt_server: Server) -> None:
    first = int(time.time()) + 2
    async with client(jwt_server, token=token("forever", exp=first)) as c:
        await c.send({"type": "refresh", "token": token("forever", ttl=None)})
        await silent_until(c, first + 0.5)
        await c.ping()


def _refresh_failures() -> list[tuple[str, Callable[[], str]]]:
    return [
        ("another sub", lambda: token("somebody-else")),
        ("bad signature", lambda: token("refresh-me", secret=OTHER_SECRET)),
        ("malformed", lambda: "garbage"),
        ("expired", lambda: token("refresh-me", exp=int(time.time()) - 1)),
        ("no sub", lambda: token(None)),
    ]


REFRESH_FAILURES = _refresh_failures()


@pytest.mark.parametrize(("case", "make"), REFRESH_FAILURES, ids=[f[0] for f in REFRESH_FAILURES])
async def test_refresh_refused_closes_4401(
    jwt_server: Server, case: str, make: Callable[[], str]
) -> None:
    async with client(jwt_server, token=token("refresh-me")) as c:
        await c.join(fresh("r"))
        await c.send({"type": "refresh", "token": make(), "ref": "bad"})
        frames = await c.expect_close(4401)
        assert len(frames) == 1, frames
        assert frames[0]["type"] == "error" and frames[0]["code"] == "unauthorized", frames
        assert frames[0]["ref"] == "bad"


async def test_refresh_with_fewer_rooms_leaves_the_others(jwt_server: Server) -> None:
    kept, dropped = fresh("a1"), fresh("a2")
    async with client(jwt_server, token=token("narrow", rooms=["a*"])) as c:
        await c.join(kept)
        await c.join(dropped)
        await c.send({"type": "refresh", "token": token("narrow", rooms=["a1*"]), "ref": "r"})
        await c.recv_type("left", room=dropped, ref="r")
        await c.ping()
        await c.send({"type": "join", "room": dropped, "ref": "j"})
        await c.recv_type("error", code="forbidden", ref="j", room=dropped)
        _, own = await c.chat("still here", room=kept)
        assert own["room"] == kept


async def test_refresh_ignored_in_anonymous_mode(server: Server) -> None:
    async with client(server) as c:
        await c.send({"type": "refresh", "token": "whatever", "ref": "r"})
        await c.ping()


# --- rooms ---------------------------------------------------------------------------


@asynccontextmanager
async def room_b_with_history(server: Server) -> AsyncIterator[tuple[str, Message]]:
    """Room `b-…` holding two messages, written by a token that permits every room."""
    room = fresh("b")
    async with client(server, token=token("writer")) as w:
        joined = await w.join(room)
        await w.chat("secret one", room=room)
        await w.chat("secret two", room=room)
        yield room, joined


async def test_rooms_claim_forbids_join(jwt_server: Server) -> None:
    async with (
        room_b_with_history(jwt_server) as (room_b, _),
        client(jwt_server, token=token("limited", rooms=["a*"])) as c,
    ):
        await c.send({"type": "join", "room": room_b, "ref": "j1"})
        error = await c.recv_type("error", code="forbidden", ref="j1", room=room_b)
        assert room_b in error["detail"]
        await c.ping()  # the connection stays usable


async def test_rooms_claim_forbids_replay(jwt_server: Server) -> None:
    async with (
        room_b_with_history(jwt_server) as (room_b, joined),
        client(jwt_server, token=token("limited", rooms=["a*"])) as c,
    ):
        since = {"epoch": joined["epoch"], "offset": 0}
        await c.send({"type": "join", "room": room_b, "since": since, "ref": "s"})
        await c.recv_type("error", code="forbidden", ref="s", room=room_b)
        await c.send({"type": "join", "room": room_b, "history": 10, "ref": "h"})
        await c.recv_type("error", code="forbidden", ref="h", room=room_b)
        await c.ping()  # nothing was replayed: the pong is the very next frame


async def test_rooms_claim_forbids_presence_and_chat(jwt_server: Server) -> None:
    async with (
        room_b_with_history(jwt_server) as (room_b, _),
        client(jwt_server, token=token("limited", rooms=["a*"])) as c,
    ):
        await c.send({"type": "presence", "room": room_b, "ref": "p"})
        await c.recv_type("error", code="not_joined", ref="p", room=room_b)
        await c.send({"type": "chat", "room": room_b, "text": "let me in", "ref": "c"})
        await c.recv_type("error", code="not_joined", ref="c", room=room_b)
        await c.ping()


@pytest.mark.parametrize("query", [{}, {"history": "10"}, {"since": "EPOCH:0"}])
async def test_rooms_claim_refuses_room_path_4403(
    jwt_server: Server, query: dict[str, str]
) -> None:
    async with room_b_with_history(jwt_server) as (room_b, joined):
        params = {k: v.replace("EPOCH", joined["epoch"]) for k, v in query.items()}
        raw = token("limited", rooms=["a*"])
        async with client(jwt_server, f"/ws/{room_b}", welcome=False, token=raw, **params) as c:
            error = await refused(c, 4403, "forbidden")
            assert room_b in error["detail"]


async def test_rooms_claim_permits_matching_rooms(jwt_server: Server) -> None:
    a1, lobby = fresh("a1"), fresh("lobby")
    raw = token("limited", name="Lim", rooms=["a*", lobby])
    async with client(jwt_server, token=raw) as c:
        await c.join(a1, ref="ok")
        await c.join(lobby)
        await c.chat("in a1", room=a1)
        await c.send({"type": "join", "room": "A1", "ref": "case"})  # case-sensitive
        await c.recv_type("error", code="forbidden", ref="case", room="A1")
    async with client(jwt_server, f"/ws/{a1}", token=raw, history="5") as c:
        replayed = await c.recv_type("chat", room=a1, text="in a1")
        assert replayed["user"] == {"id": "limited", "name": "Lim"}
        await c.recv_type("joined", room=a1)


async def test_empty_rooms_claim_permits_no_room(jwt_server: Server) -> None:
    async with client(jwt_server, token=token("nobody", rooms=[])) as c:
        await c.send({"type": "join", "room": "a1", "ref": "x"})
        await c.recv_type("error", code="forbidden", ref="x", room="a1")


# --- origins ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin", ["https://chat.example", "https://CHAT.example:443", "http://localhost:8080"]
)
async def test_listed_origin_connects(origin_server: Server, origin: str) -> None:
    async with browser(origin_server, origin=origin) as c:
        await c.recv_type("welcome")
        await c.ping()


@pytest.mark.parametrize(
    "origin",
    ["https://evil.example", "http://chat.example", "https://chat.example.evil.example", "null"],
)
async def test_unlisted_origin_refused_4403(origin_server: Server, origin: str) -> None:
    async with browser(origin_server, origin=origin) as c:
        error = await refused(c, 4403, "origin_not_allowed")
        assert "ALLOWED_ORIGINS" in error["detail"]
    async with browser(origin_server, f"/ws/{fresh('lobby')}", origin=origin) as c:
        await refused(c, 4403, "origin_not_allowed")


async def test_no_origin_header_is_not_refused(origin_server: Server) -> None:
    async with client(origin_server) as c:  # websockets sends no Origin by default
        await c.ping()


async def test_origin_checked_before_token(jwt_server: Server) -> None:
    async with browser(jwt_server, origin="https://evil.example", token=token("ok")) as c:
        await refused(c, 4403, "origin_not_allowed")
    async with browser(jwt_server, origin="https://chat.example") as c:
        await refused(c, 4401, "unauthorized")
    async with browser(jwt_server, origin="https://chat.example", token=token("ok")) as c:
        welcome = await c.recv_type("welcome")
        assert welcome["user"]["id"] == "ok"


# --- anonymous mode -----------------------------------------------------------------------


async def test_anonymous_mode_unchanged_without_secret(server: Server) -> None:
    async with client(server, username="Anon", client="my-client-1", token="not-even-a-jwt") as c:
        assert c.user == {
            "id": "anon-" + hashlib.sha256(b"my-client-1").hexdigest()[:20],
            "name": "Anon",
        }
        await c.join(fresh("b"))
    async with client(server, f"/ws/{fresh('b')}", token=token(rooms=["a*"])) as c:
        await c.recv_type("joined")  # a token is ignored: no secret, no rooms limit


# --- logs ----------------------------------------------------------------------------------


async def _log_containing(server: Server, needles: Sequence[str], within: float = 5.0) -> str:
    deadline = time.monotonic() + within
    while True:
        text = server.log()
        if all(n in text for n in needles):
            return text
        if time.monotonic() > deadline:
            missing = [n for n in needles if n not in text]
            raise AssertionError(f"the server log never showed {missing}:\n{text[-3000:]}")
        await asyncio.sleep(0.02)  # polling interval, bounded by the deadline


async def test_tokens_never_reach_the_log(jwt_server: Server) -> None:
    good = token("log-user", name="Log")
    expired = token("log-user", exp=int(time.time()) - 10)
    room = fresh("lg")
    async with client(jwt_server, f"/ws/{room}", token=good, username="x") as c:
        await c.recv_type("joined", room=room)
    async with client(jwt_server, welcome=False, token=expired) as c:
        await refused(c, 4401, "unauthorized")
    status, _ = await get(jwt_server, f"/healthz?token={good}")
    assert status == 200
    text = await _log_containing(
        jwt_server,
        [
            f'"WebSocket /ws/{room}?token=[redacted]&username=x" [accepted]',
            '"WebSocket /ws?token=[redacted]" [accepted]',
            '"GET /healthz?token=[redacted] HTTP/1.1" 200',
            "refused a connection: The token has expired",
        ],
    )
    for raw in (good, expired):
        assert raw not in text
        assert raw.split(".")[2] not in text  # not even the signature


# --- roomcast token -----------------------------------------------------------------------


def run_cli(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """`roomcast ARGS` from an empty directory, without any JWT_SECRET but `env`'s."""
    full = {k: v for k, v in os.environ.items() if k not in ("JWT_SECRET", "PYTHONPATH")}
    full["PYTHONPATH"] = str(REPO)
    full.update(env)
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run(
            [sys.executable, "-m", "roomcast", *args],
            capture_output=True,
            text=True,
            env=full,
            cwd=cwd,
            timeout=30,
            check=False,
        )


async def test_cli_token_mints_a_working_token(jwt_server: Server) -> None:
    before = int(time.time())
    args = [
        "token",
        "--sub",
        "alice",
        "--name",
        "Alice",
        "--rooms",
        "lobby,team-*",
        "--ttl",
        "3600",
    ]
    result = await asyncio.to_thread(run_cli, args, JWT_SECRET=SECRET)
    assert result.returncode == 0, result.stderr
    raw = result.stdout.strip()
    assert "\n" not in raw
    claims = jwt.decode(raw, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["name"] == "Alice"
    assert claims["rooms"] == ["lobby", "team-*"]
    assert before + 3600 <= claims["exp"] <= int(time.time()) + 3600
    async with client(jwt_server, token=raw) as c:
        assert c.user == {"id": "alice", "name": "Alice"}
        await c.join("team-" + uuid.uuid4().hex[:8])
        await c.send({"type": "join", "room": fresh("other"), "ref": "no"})
        await c.recv_type("error", code="forbidden", ref="no")


def test_cli_token_secret_option_and_defaults() -> None:
    result = run_cli(["token", "--sub", "bob", "--secret", OTHER_SECRET], JWT_SECRET=SECRET)
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), OTHER_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "bob" and "name" not in claims and "rooms" not in claims
    assert 3500 <= claims["exp"] - time.time() <= 3601


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["token", "--sub", "bob"], "JWT_SECRET"),
        (["token", "--sub", "bob", "--secret", SECRET, "--ttl", "0"], "--ttl"),
        (["token", "--sub", "bob", "--secret", SECRET, "--rooms", "a?,b"], "--rooms"),
        (["token", "--sub", " ", "--secret", SECRET], "--sub"),
    ],
)
def test_cli_token_errors_exit_2(args: list[str], phrase: str) -> None:
    result = run_cli(args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("roomcast: ") and phrase in lines[0], lines


def test_cli_token_requires_sub() -> None:
    result = run_cli(["token", "--secret", SECRET])
    assert result.returncode == 2 and "--sub" in result.stderr
