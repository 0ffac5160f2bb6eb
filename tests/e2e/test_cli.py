"""`roomcast serve` / `roomcast schema`: settings validation, workers, options, PORT, heartbeat.

Every test runs the real command in a subprocess (the way Heroku and a developer
run it) with an environment stripped of the configuration variables, from an
empty working directory (so no stray `.env` is read).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from roomcast.settings import Settings

from ..rawws import RawWebSocket
from ..servers import Server, start_server

REPO = Path(__file__).resolve().parent.parent.parent

# PROTOCOL.md, "Configuration": every variable, in the table's order.
CONFIG_VARS = (
    "PORT",
    "BROADCAST_URL",
    "HISTORY_URL",
    "HISTORY_SIZE",
    "HISTORY_TTL",
    "JWT_SECRET",
    "API_KEY",
    "ALLOWED_ORIGINS",
    "MAX_MESSAGE_BYTES",
    "MAX_TEXT_CHARS",
    "MAX_NAME_CHARS",
    "OUTBOX_SIZE",
    "RATE_LIMIT",
    "MAX_CONNECTIONS",
    "MAX_ROOMS",
    "HEARTBEAT_SECONDS",
    "PRESENCE_EVENTS_MAX",
    "PRESENCE_LIST_MAX",
    "PRESENCE_TTL",
    "HANDSHAKE_TIMEOUT",
    "CONNECT_RATE",
    "FORWARDED_ALLOW_IPS",
    "HISTORY_MEMORY_MB",
)

# Read by `roomcast serve` (beside the settings) and by the client commands.
CLIENT_VARS = ("WEB_CONCURRENCY", "LOG_FORMAT", "ROOMCAST_URL", "ROOMCAST_TOKEN")

RUN_TIMEOUT = 20.0
_RUNNING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without any roomcast/uvicorn setting, plus `extra`; imports this checkout."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in CONFIG_VARS and k not in CLIENT_VARS and k != "PYTHONPATH"
    }
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


@dataclass
class Outcome:
    returncode: int | None  # None: it started serving (and was killed)
    output: str


def run_serve(
    args: list[str], env: dict[str, str], timeout: float = RUN_TIMEOUT, until_serving: bool = True
) -> Outcome:
    """Run `roomcast serve ARGS` until it exits, or (`until_serving`) reports that it serves.

    Fails the test if neither happens within `timeout` seconds; the process never outlives this.
    """
    with tempfile.TemporaryDirectory() as cwd, tempfile.TemporaryFile() as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "roomcast", "serve", "--host", "127.0.0.1", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,  # its own process group: workers are killed with it
        )

        def output() -> str:
            out.seek(0)
            return out.read().decode(errors="replace")

        deadline = time.monotonic() + timeout
        try:
            while process.poll() is None:
                if until_serving and _RUNNING.search(output()):
                    break
                if time.monotonic() >= deadline:
                    what = "exited nor served" if until_serving else "exited"
                    pytest.fail(f"roomcast serve {args} neither {what} in {timeout}s:\n{output()}")
                time.sleep(0.05)
        finally:
            code = process.poll()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
        return Outcome(code, output())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- bad settings


@pytest.mark.parametrize(
    ("env", "variable", "why"),
    [
        ({"OUTBOX_SIZE": "2000"}, "OUTBOX_SIZE", "HISTORY_SIZE"),
        ({"OUTBOX_SIZE": "1000"}, "OUTBOX_SIZE", "below"),
        ({"MAX_ROOMS": "abc"}, "MAX_ROOMS", "integer"),
        ({"BROADCAST_URL": "ftp://x"}, "BROADCAST_URL", "scheme"),
        ({"HISTORY_URL": "kafka://x"}, "HISTORY_URL", "scheme"),
        ({"HISTORY_URL": "sqlite://"}, "HISTORY_URL", "file"),
        ({"HEARTBEAT_SECONDS": "0"}, "HEARTBEAT_SECONDS", "at least 1"),
        ({"HEARTBEAT_SECONDS": "1.5"}, "HEARTBEAT_SECONDS", "integer"),
        ({"MAX_MESSAGE_BYTES": "100"}, "MAX_MESSAGE_BYTES", "at least"),
        ({"WEB_CONCURRENCY": "two"}, "WEB_CONCURRENCY", "integer"),
        ({"WEB_CONCURRENCY": "0"}, "WEB_CONCURRENCY", "at least 1"),
        ({"WS_COMPRESSION": "gzip"}, "WS_COMPRESSION", "off, shared, per-connection"),
        ({"FAST_WRITES": "on"}, "FAST_WRITES", "auto, off"),
        ({"CONNECT_RATE": "-1"}, "CONNECT_RATE", "at least 0"),
        ({"HANDSHAKE_TIMEOUT": "0"}, "HANDSHAKE_TIMEOUT", "at least 1"),
        ({"HISTORY_MEMORY_MB": "lots"}, "HISTORY_MEMORY_MB", "integer"),
        ({"HOOK_TIMEOUT": "0"}, "HOOK_TIMEOUT", "at least 1"),
        ({"JWT_SECRET": "change-me"}, "JWT_SECRET", "at least 32"),
        ({"API_KEY": "short"}, "API_KEY", "at least 16"),
        ({"ALLOWED_ORIGINS": "allowed.example"}, "ALLOWED_ORIGINS", "scheme://host[:port]"),
        ({"FORWARDED_ALLOW_IPS": "a.proxy"}, "FORWARDED_ALLOW_IPS", "IP address or network"),
        ({"JOIN_HOOK_URL": "ftp://x/join", "HOOK_SECRET": "s" * 16}, "JOIN_HOOK_URL", "http://"),
        ({"CONNECT_HOOK_URL": "http://127.0.0.1/c"}, "HOOK_SECRET", "CONNECT_HOOK_URL is set"),
        ({"HOOK_SECRET": "short"}, "HOOK_SECRET", "at least 16"),
    ],
    ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None,
)
def test_bad_setting_stops_startup_naming_the_variable(
    env: dict[str, str], variable: str, why: str
) -> None:
    outcome = run_serve(["--port", "0"], clean_env(**env))
    assert outcome.returncode == 2, outcome.output
    assert variable in outcome.output
    assert why in outcome.output
    assert "Traceback" not in outcome.output
    assert "Started server process" not in outcome.output


def test_forwarded_headers_are_trusted_from_loopback_unless_on_heroku() -> None:
    assert Settings.from_environ({}, env_file=None).forwarded_allow_ips == "127.0.0.1"
    on_heroku = Settings.from_environ({"DYNO": "web.1"}, env_file=None)
    assert on_heroku.forwarded_allow_ips == "*"  # the router is the only way in
    chosen = Settings.from_environ({"DYNO": "web.1", "FORWARDED_ALLOW_IPS": "10.0.0.1"})
    assert chosen.forwarded_allow_ips == "10.0.0.1"


def test_bad_option_value_names_the_option() -> None:
    outcome = run_serve(["--port", "0", "--heartbeat-seconds", "0"], clean_env())
    assert outcome.returncode == 2, outcome.output
    assert "HEARTBEAT_SECONDS" in outcome.output
    assert "at least 1" in outcome.output


def test_option_overrides_bad_environment_value() -> None:
    """--max-rooms 3 wins over an invalid MAX_ROOMS in the environment: the server starts."""
    outcome = run_serve(["--port", "0", "--max-rooms", "3"], clean_env(MAX_ROOMS="abc"))
    assert outcome.returncode is None, outcome.output


def test_port_out_of_range_is_refused() -> None:
    """PORT=70000 must be refused by name (uvicorn otherwise binds 70000 % 65536 = 4464)."""
    outcome = run_serve([], clean_env(PORT="70000"))
    assert outcome.returncode == 2, outcome.output
    assert "PORT" in outcome.output
    assert "Started server process" not in outcome.output


# ---------------------------------------------------------------- workers


def test_web_concurrency_with_memory_runs_one_worker_and_says_why() -> None:
    server = start_server(env={"WEB_CONCURRENCY": "3", "BROADCAST_URL": "memory://"})
    try:
        log = server.log()
        assert log.count("Started server process") == 1, log
        assert "Started parent process" not in log, log
        warning = next((line for line in log.splitlines() if "WEB_CONCURRENCY" in line), None)
        assert warning is not None, log
        assert "memory" in warning
        assert "1 worker" in warning
        assert server.get_json("/healthz")
    finally:
        server.terminate()


def test_explicit_workers_with_memory_is_refused() -> None:
    outcome = run_serve(["--port", "0", "--workers", "2"], clean_env())
    assert outcome.returncode is not None and outcome.returncode != 0, outcome.output
    assert "memory" in outcome.output
    assert "--workers" in outcome.output
    assert "Started" not in outcome.output


def test_several_workers_need_a_shared_history_store() -> None:
    """PROTOCOL.md: HISTORY_URL "several workers need a shared one"; per-process history
    would hand out the same offsets twice. Refused before anything starts."""
    outcome = run_serve(
        [
            "--port",
            "0",
            "--workers",
            "2",
            "--broadcast-url",
            "redis://127.0.0.1:1",
            "--history-url",
            "memory://",
        ],
        clean_env(),
    )
    assert outcome.returncode == 2, outcome.output
    assert "HISTORY_URL" in outcome.output
    assert "Started" not in outcome.output


def test_workers_that_cannot_start_do_not_leave_a_parent_serving_nothing() -> None:
    """With several workers the app is built in the children; if it cannot be (here: a
    backend that is unavailable or unreachable), the command must still fail, naming the
    setting, not keep a bound port that never answers (Heroku would think it booted)."""
    outcome = run_serve(
        ["--port", "0", "--workers", "2"],
        clean_env(BROADCAST_URL="redis://127.0.0.1:1"),
        until_serving=False,
    )
    assert outcome.returncode is not None and outcome.returncode != 0, outcome.output
    assert "BROADCAST_URL" in outcome.output or "HISTORY_URL" in outcome.output


# ---------------------------------------------------------------- options


def roomcast(
    *args: str, stdin: str | None = None, timeout: float = RUN_TIMEOUT, **env: str
) -> subprocess.CompletedProcess[str]:
    """A roomcast command that ends by itself, in a clean environment plus `env`."""
    return subprocess.run(
        [sys.executable, "-m", "roomcast", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=clean_env(**env),
        timeout=timeout,
        check=False,
    )


def test_serve_help_lists_an_option_for_every_setting() -> None:
    result = roomcast("serve", "--help")
    assert result.returncode == 0, result.stderr
    options = set(re.findall(r"--[a-z][a-z-]*", result.stdout))
    missing = [var for var in CONFIG_VARS if "--" + var.lower().replace("_", "-") not in options]
    assert not missing, f"roomcast serve --help has no option for {missing}:\n{result.stdout}"


async def _recv_json(ws: object, within: float = 5.0) -> dict[str, object]:
    frame = await asyncio.wait_for(ws.recv(), within)  # type: ignore[attr-defined]
    message = json.loads(frame)
    assert isinstance(message, dict)
    return message


async def _recv_type(ws: object, kind: str, within: float = 5.0) -> dict[str, object]:
    """The next `kind` message, or the next error, skipping others."""
    deadline = time.monotonic() + within
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"no {kind!r} within {within}s")
        message = await _recv_json(ws, remaining)
        if message["type"] == kind or message["type"] == "error":
            return message


async def test_option_overrides_environment_end_to_end() -> None:
    server = start_server(env={"MAX_ROOMS": "5"}, args=["--max-rooms", "1"])
    try:
        async with connect(server.ws + "/ws/lobby") as ws:
            assert (await _recv_json(ws))["type"] == "welcome"
            joined = await _recv_type(ws, "joined")
            assert joined["type"] == "joined" and joined["room"] == "lobby", joined
            await ws.send(json.dumps({"type": "join", "room": "second", "ref": "j2"}))
            answer = await _recv_type(ws, "joined")
            assert answer["type"] == "error", answer
            assert answer["code"] == "too_many_rooms", answer
            assert answer["ref"] == "j2", answer
    finally:
        server.terminate()


def test_port_environment_variable_is_the_default_port() -> None:
    port = free_port()
    with (
        tempfile.TemporaryDirectory() as cwd,
        tempfile.NamedTemporaryFile(prefix="roomcast-port-", suffix=".log") as log,
    ):
        process = subprocess.Popen(
            [sys.executable, "-m", "roomcast", "serve", "--host", "127.0.0.1"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=clean_env(PORT=str(port)),
            cwd=cwd,
        )
        server = Server(process, port, Path(log.name))
        try:
            deadline = time.monotonic() + RUN_TIMEOUT
            while not _RUNNING.search(server.log()):
                assert process.poll() is None, server.log()
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.05)
            assert _RUNNING.search(server.log()).group(1) == str(port)  # type: ignore[union-attr]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                assert r.status == 200
        finally:
            server.terminate()


# ---------------------------------------------------------------- schema


def test_schema_command_prints_the_json_schema() -> None:
    result = roomcast("schema")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert "ClientMessage" in document["$defs"]
    assert "ServerMessage" in document["$defs"]


# ---------------------------------------------------------------- heartbeat


def test_heartbeat_drops_a_client_that_never_answers_pings() -> None:
    heartbeat = 1
    server = start_server(env={"HEARTBEAT_SECONDS": str(heartbeat)})
    raw = None
    try:
        raw = RawWebSocket(server.port, "/ws/lobby")
        assert raw.status_line.startswith("HTTP/1.1 101"), raw.status_line
        connected = time.monotonic()

        ping_deadline = connected + 2 * heartbeat + 2
        texts: list[dict[str, object]] = []
        ping_at = None
        while ping_at is None:
            try:
                frame = raw.read_frame(ping_deadline)
            except TimeoutError:
                pytest.fail(f"no ping within {2 * heartbeat + 2}s (texts: {texts})")
            assert frame is not None, f"closed before any ping (texts: {texts})"
            opcode, payload = frame
            if opcode == 0x1:
                texts.append(json.loads(payload))
            elif opcode == 0x9:
                ping_at = time.monotonic()
            else:
                pytest.fail(f"unexpected opcode {opcode:#x} before the ping: {payload!r}")
        assert texts and texts[0]["type"] == "welcome", texts
        assert texts[0]["heartbeat"] == heartbeat, texts[0]

        # Never answer: the server must give up and close the TCP connection.
        close_deadline = ping_at + 2 * heartbeat + 3
        close_frames: list[bytes] = []
        while True:
            try:
                frame = raw.read_frame(close_deadline)
            except TimeoutError:
                pytest.fail(
                    f"still connected {close_deadline - ping_at:.0f}s after an unanswered ping"
                )
            if frame is None:
                break
            opcode, payload = frame
            if opcode == 0x8:
                close_frames.append(payload)
        if close_frames and len(close_frames[0]) >= 2:
            (code,) = struct.unpack("!H", close_frames[0][:2])
            assert code in (1001, 1006, 1011), code
        # The server stays up for everyone else.
        assert server.get_json("/healthz")
    finally:
        if raw is not None:
            raw.close()
        server.terminate()


async def test_heartbeat_keeps_a_client_that_answers_pings() -> None:
    """Control for the test above: a client that answers pings outlives several heartbeats."""
    heartbeat = 1
    server = start_server(env={"HEARTBEAT_SECONDS": str(heartbeat)})
    try:
        async with connect(server.ws + "/ws/lobby", ping_interval=None) as ws:
            assert (await _recv_json(ws))["type"] == "welcome"
            assert (await _recv_type(ws, "joined"))["type"] == "joined"
            # The duration is the property under test: alive after 3.5 heartbeats.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.wait_closed(), 3.5 * heartbeat)
            await ws.send(json.dumps({"type": "ping", "ref": "p"}))
            assert (await _recv_type(ws, "pong"))["type"] == "pong"
    finally:
        server.terminate()


def test_an_unreachable_broker_is_named_without_its_password() -> None:
    outcome = run_serve(
        ["--port", "0"],
        clean_env(BROADCAST_URL="redis://:hunter2secret@127.0.0.1:1/0"),
        until_serving=False,
    )
    assert outcome.returncode == 2, outcome.output
    assert "cannot be reached" in outcome.output and "redis://:***@127.0.0.1:1/0" in outcome.output
    assert "hunter2secret" not in outcome.output
