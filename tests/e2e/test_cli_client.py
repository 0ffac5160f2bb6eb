"""`roomcast listen`, `send` and `chat` run as subprocesses against real servers."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest

from roomcast.web.auth import mint_token

from ..servers import Server, start_server
from ..support import validator
from .test_cli import clean_env, free_port
from .test_cli import roomcast as run_roomcast

TIMEOUT = 15.0
SECRET = "cli-client-test-secret-of-32-bytes-or-more"


def roomcast(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """A client command that ends by itself."""
    return run_roomcast(*args, stdin=stdin, timeout=TIMEOUT, **env)


@asynccontextmanager
async def listening(server: Server, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """`roomcast listen ARGS` (URL from $ROOMCAST_URL), once it said it joined every room."""
    rooms = [a for a in args if not a.startswith("-") and not a.isdigit()]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "roomcast",
        "listen",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(ROOMCAST_URL=server.ws),
    )
    try:
        assert process.stderr is not None
        joined: list[str] = []
        async with asyncio.timeout(TIMEOUT):
            while len(joined) < len(rooms):
                said = (await process.stderr.readline()).decode()
                assert said, f"listen ended: {said!r}"
                assert said.startswith("roomcast: joined "), said
                joined.append(said)
        yield process
    finally:
        if process.returncode is None:
            process.terminate()
        async with asyncio.timeout(TIMEOUT):
            await process.wait()


async def next_line(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    async with asyncio.timeout(TIMEOUT):
        line = (await process.stdout.readline()).decode()
    assert line, "listen ended without printing"
    return line.rstrip("\n")


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("roomcast: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


async def test_listen_prints_what_send_sends(server: Server) -> None:
    async with listening(server, "cli-listen", "cli-other") as listener:
        result = await asyncio.to_thread(
            roomcast,
            "send",
            "cli-listen",
            "hello from send",
            "--username",
            "ann",
            ROOMCAST_URL=server.ws,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "1"
        lines = [await next_line(listener) for _ in range(3)]
        assert re.fullmatch(r"\[cli-listen \d\d:\d\d:\d\d\] \* ann joined \(2 online\)", lines[0])
        assert re.fullmatch(r"\[cli-listen #1 \d\d:\d\d:\d\d\] ann: hello from send", lines[1])
        assert re.fullmatch(r"\[cli-listen \d\d:\d\d:\d\d\] \* ann left \(1 online\)", lines[2])


async def test_listen_json_lines_parse_and_validate(server: Server) -> None:
    for text in ("first", "second"):
        result = await asyncio.to_thread(
            roomcast, "send", "cli-json", text, "--url", server.ws + "/ws"
        )
        assert result.returncode == 0, result.stderr
    schema = validator(server)
    async with listening(server, "cli-json", "--json", "--history", "2") as listener:
        frames = [json.loads(await next_line(listener)) for _ in range(2)]
    assert [(f["type"], f["offset"], f["text"]) for f in frames] == [
        ("chat", 1, "first"),
        ("chat", 2, "second"),
    ]
    for frame in frames:
        assert not list(schema.iter_errors(frame)), frame


def test_chat_sends_stdin_lines_prints_the_room_and_leaves_at_eof(server: Server) -> None:
    result = roomcast(
        "chat", "cli-chat", "--username", "carl", stdin="one\n\ntwo\n", ROOMCAST_URL=server.ws
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [re.sub(r" \d\d:\d\d:\d\d\]", "]", x) for x in lines] == [
        "[cli-chat #1] carl: one",
        "[cli-chat #2] carl: two",
    ]
    assert "Traceback" not in result.stderr


def test_server_down_is_one_line_and_exit_3() -> None:
    url = f"ws://127.0.0.1:{free_port()}"
    one_line_error(roomcast("send", "lobby", "x", "--url", url), 3, "cannot connect", url)
    one_line_error(roomcast("listen", "lobby", ROOMCAST_URL=url), 3, "cannot connect")


def test_invalid_room_is_one_line_and_exit_6(server: Server) -> None:
    one_line_error(roomcast("send", "no spaces", "x", "--url", server.ws), 6, "Room names")
    one_line_error(roomcast("listen", "bad/room", "ok", "--url", server.ws), 6, "Room names")


@pytest.fixture(scope="module")
def jwt_srv() -> Iterator[Server]:
    server = start_server({"JWT_SECRET": SECRET})
    yield server
    server.terminate()


def test_bad_token_is_one_line_and_exit_4(jwt_srv: Server) -> None:
    one_line_error(roomcast("send", "lobby", "x", "--url", jwt_srv.ws), 4, "token")
    forged = mint_token("another-secret-of-at-least-32-bytes!", "ann")
    one_line_error(
        roomcast("listen", "lobby", "--url", jwt_srv.ws, ROOMCAST_TOKEN=forged), 4, "signature"
    )


def test_forbidden_room_is_one_line_and_exit_5_and_a_good_token_works(jwt_srv: Server) -> None:
    token = mint_token(SECRET, "ann", name="Ann", rooms=["lobby"])
    one_line_error(
        roomcast("send", "other", "x", "--url", jwt_srv.ws, "--token", token), 5, "other"
    )
    result = roomcast("send", "lobby", "allowed", "--url", jwt_srv.ws, ROOMCAST_TOKEN=token)
    assert (result.returncode, result.stdout.strip()) == (0, "1"), result.stderr
