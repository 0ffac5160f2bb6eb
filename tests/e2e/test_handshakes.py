"""HANDSHAKE_TIMEOUT: sockets that do not finish their request in time are cut, and
sockets still handshaking never take the descriptors that clients need.

Against a real `roomcast serve`; the first test checks what `cli.handshakes`
relies on in the installed uvicorn.
"""

from __future__ import annotations

import asyncio
import inspect
import pickle
import socket
import time
from collections.abc import Iterator

import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from roomcast.cli.handshakes import GuardedHttp, Handshakes, http_protocol

from ..attacks import (
    ATTACKER,
    chatter,
    half_handshakes,
    limit_fds,
    metric,
    open_fds,
    still_open,
)
from ..servers import Server, start_server
from ..support import client

TIMEOUT = 2  # HANDSHAKE_TIMEOUT of these servers: short, so that the tests are


def test_uvicorn_still_has_what_the_handshake_guard_relies_on() -> None:
    """The hooks GuardedHttp overrides exist, with the roles it assumes."""
    source = inspect.getsource(HttpToolsProtocol)
    for hook in (
        "connection_made",
        "connection_lost",
        "on_message_begin",
        "on_message_complete",
        "handle_websocket_upgrade",
    ):
        assert callable(getattr(HttpToolsProtocol, hook)), hook
        assert hook in GuardedHttp.__dict__, hook
    assert "self.parser = httptools.HttpRequestParser(self)" in source  # callbacks on self
    # The upgrade hands the transport to the WebSocket protocol: ours is not told it closes.
    upgrade = inspect.getsource(HttpToolsProtocol.handle_websocket_upgrade)
    assert "self.transport.set_protocol(protocol)" in upgrade
    assert "self.cycle" in source and "response_complete" in source
    assert "self.loop" in inspect.getsource(HttpToolsProtocol.__init__)


def test_each_worker_gets_its_own_empty_handshakes() -> None:
    """uvicorn pickles its config into each worker process, the factory with it."""
    factory = http_protocol(7, 100)
    copy = pickle.loads(pickle.dumps(factory))
    shared = factory.keywords["handshakes"]  # type: ignore[attr-defined]
    theirs = copy.keywords["handshakes"]
    assert theirs is not shared and (theirs.timeout, theirs.max_connections) == (7, 100)
    assert len(theirs) == 0


def test_the_cap_is_a_quarter_of_the_descriptors_at_most_max_connections() -> None:
    assert Handshakes(10, 10_000, lambda: 256).cap == 64
    assert Handshakes(10, 30, lambda: 1024).cap == 30
    assert Handshakes(10, 3, lambda: 1024).cap == 16  # a floor for tiny settings


@pytest.fixture(scope="module")
def guarded() -> Iterator[Server]:
    srv = start_server({"HANDSHAKE_TIMEOUT": str(TIMEOUT), "PYTHONUNBUFFERED": "1"})
    yield srv
    srv.terminate()


def cut_within(sock: socket.socket, seconds: float) -> bytes:
    """Everything the server sends until it closes the socket (which must be within
    `seconds`)."""
    sock.settimeout(seconds)
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def test_a_half_request_is_answered_408_and_closed_in_time(guarded: Server) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        answer = cut_within(sock, TIMEOUT + 2)
        assert time.monotonic() - started >= TIMEOUT - 0.5  # not before its time
    assert answer.startswith(b"HTTP/1.1 408 "), answer


def test_a_silent_socket_is_closed_in_time(guarded: Server) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        assert cut_within(sock, TIMEOUT + 2).startswith(b"HTTP/1.1 408 ")


def test_a_body_that_never_ends_is_cut(guarded: Server) -> None:
    """The request is in only when its body is: the app reading it sees a disconnect."""
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(
            b"POST /api/rooms/a/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
        )
        cut_within(sock, TIMEOUT + 2)


def test_a_second_request_on_a_kept_alive_connection_is_timed_too(guarded: Server) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        first = b""
        while not first.endswith(b'{"status":"ok"}'):
            chunk = sock.recv(4096)
            assert chunk, first
            first += chunk
        assert first.startswith(b"HTTP/1.1 200 "), first
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # and never the rest
        assert cut_within(sock, TIMEOUT + 2).startswith(b"HTTP/1.1 408 ")


async def test_a_websocket_outlives_the_handshake_timeout(guarded: Server) -> None:
    async with client(guarded) as conn:
        await asyncio.sleep(TIMEOUT + 1)  # past the timeout: it must not apply any more
        await conn.ping()


@pytest.mark.slow
async def test_a_thousand_half_handshakes_never_starve_clients() -> None:
    """Issue 14, attack 2: with the server's fd limit at 256, 1,000 sockets send
    `GET /ws HTTP/1.1\\r\\n` and nothing more, while a real client connects and
    chats every half second: every attempt of the real client succeeds, the
    server's descriptors stay within its cap, and every half-open socket is gone
    within HANDSHAKE_TIMEOUT + 2 s."""
    server = start_server({"HANDSHAKE_TIMEOUT": str(TIMEOUT)})
    try:
        pid = server.process.pid
        await limit_fds(pid, 256)
        base = open_fds(pid)
        stop = asyncio.Event()
        real = asyncio.create_task(chatter(server, "lobby", stop, gap=0.25))
        await asyncio.sleep(0.5)  # the real client is in before the attack starts
        held = await asyncio.to_thread(half_handshakes, server.port, 1000, ATTACKER)
        last_opened = time.monotonic()
        assert len(held) == 1000  # the server kept accepting: its fds never ran out
        try:
            assert open_fds(pid) <= base + 64 + 8  # the cap: a quarter of 256, and clients
            # Polled until every socket is closed, bounded by the timeout.
            while still_open(held):
                assert time.monotonic() - last_opened < TIMEOUT + 2, still_open(held)
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)  # the real client chats on after the attack
        finally:
            stop.set()
            outcomes = await real
            for sock in held:
                sock.close()
        assert outcomes and set(outcomes) == {"ok"}, outcomes
        cut = metric(server, 'roomcast_refused_connections_total{reason="handshake_cap"}')
        expired = metric(server, 'roomcast_refused_connections_total{reason="handshake_timeout"}')
        assert cut + expired == 1000 and cut > 0 and expired > 0
    finally:
        server.terminate()
