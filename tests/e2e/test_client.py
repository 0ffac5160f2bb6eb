"""The typed Python client (service/client.py) against real servers: requests, events,
restarts under it, recovery failure, token refresh and the heartbeat."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from roomcast.client import (
    Client,
    ClientError,
    ConnectionFailed,
    Disconnected,
    Event,
    InvalidRoom,
    NotJoined,
    Reconnected,
    RecoveryFailed,
    Unauthorized,
)
from roomcast.client.rules import backoff_delay, refresh_margin, token_expiry, ws_endpoint
from roomcast.protocol.envelopes import Ack, Chat, Joined, Left, Presence, System
from roomcast.web.auth import mint_token

from ..servers import Server, start_server
from .test_cli import free_port

TIMEOUT = 10.0
README = Path(__file__).resolve().parent.parent.parent / "README.md"
E = TypeVar("E")


@asynccontextmanager
async def connected(url: str, **options: object) -> AsyncIterator[Client]:
    client = Client(url, timeout=TIMEOUT, **options)  # type: ignore[arg-type]
    async with asyncio.timeout(TIMEOUT + 5):
        await client.connect()
    try:
        yield client
    finally:
        async with asyncio.timeout(TIMEOUT + 5):
            await client.close()


async def next_of(client: Client, kind: type[E], within: float = TIMEOUT) -> tuple[E, list[Event]]:
    """The next event of `kind`, and what came before it."""
    before: list[Event] = []
    async with asyncio.timeout(within):
        async for event in client:
            if isinstance(event, kind):
                return event, before
            before.append(event)
    raise AssertionError(f"iteration ended before a {kind.__name__}: {before}")


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    server = start_server({"RATE_LIMIT": "5000"})
    yield server
    server.terminate()


def restart(server: Server, env: dict[str, str]) -> Server:
    """SIGTERM (members get 1012), then a new server on the same port."""
    server.terminate()
    return start_server(env, args=["--port", str(server.port)])


def test_url_is_normalised_to_the_multiplexed_endpoint() -> None:
    q = {"client": "c1"}
    assert ws_endpoint("ws://h:1", q) == "ws://h:1/ws?client=c1"
    assert ws_endpoint("ws://h:1/ws/", q) == "ws://h:1/ws?client=c1"
    assert ws_endpoint("http://h:1/rt", q) == "ws://h:1/rt/ws?client=c1"
    assert ws_endpoint("wss://h/ws?x=1", q) == "wss://h/ws?x=1&client=c1"
    with pytest.raises(ValueError):
        ws_endpoint("ftp://h", q)


def test_backoff_refresh_margin_and_token_expiry() -> None:
    assert all(0 <= backoff_delay(n, 0.25, 8.0) <= min(8.0, 0.25 * 2**n) for n in range(12))
    assert refresh_margin(3) == 1.0 and refresh_margin(40) == 10.0 and refresh_margin(1e6) == 60
    token = mint_token(SECRET, "ann", ttl=100)
    expiry = token_expiry(token)
    assert expiry is not None and abs(expiry - (time.time() + 100)) < 2
    assert token_expiry(mint_token(SECRET, "ann", ttl=None)) is None
    assert token_expiry("not-a-jwt") is None


def public_id(client_id: str) -> str:
    """The anonymous user's public id, derived from the secret `client` (PROTOCOL.md)."""
    return "anon-" + hashlib.sha256(client_id.encode()).hexdigest()[:20]


async def test_join_send_ack_presence_leave_are_typed(srv: Server) -> None:
    async with (
        connected(srv.ws, username="ann") as ann,
        connected(srv.ws + "/ws", username="bob") as bob,
    ):
        joined = await ann.join("typed")
        assert isinstance(joined, Joined) and joined.offset == 0 and joined.online == 1
        assert ann.welcome is not None and ann.welcome.user.name == "ann"
        assert ann.welcome.user.id == public_id(ann.client_id)  # stable, from the secret
        await bob.join("typed")
        event, _ = await next_of(ann, System)
        assert (event.event, event.user.name, event.online) == ("join", "bob", 2)

        ack = await ann.send("typed", "hello")
        assert isinstance(ack, Ack) and ack.offset == 1 and ack.ref
        chat, before = await next_of(bob, Chat)
        assert (chat.offset, chat.text, chat.user.name) == (1, "hello", "ann")
        assert before == []  # the joined answered bob's request: not yielded
        own, before = await next_of(ann, Chat)
        assert own.offset == 1 and before == []  # the ack was the request's, not an event

        presence = await bob.presence("typed")
        assert isinstance(presence, Presence) and presence.online == 2
        assert sorted(u.name for u in presence.users) == ["ann", "bob"]

        left = await ann.leave("typed")
        assert isinstance(left, Left) and left.room == "typed"
        event, _ = await next_of(bob, System)
        assert (event.event, event.user.name, event.online) == ("leave", "ann", 1)

        with pytest.raises(InvalidRoom) as invalid:
            await ann.join("no spaces")
        assert invalid.value.code == "invalid_room" and invalid.value.ref
        assert "characters" in invalid.value.detail
        with pytest.raises(NotJoined) as not_joined:
            await ann.send("typed", "after leaving")
        assert not_joined.value.code == "not_joined" and not_joined.value.room == "typed"
        assert isinstance(not_joined.value, ClientError)
        # The connection is still usable after both errors.
        assert (await ann.join("typed")).online == 2


async def test_history_is_yielded_in_order_before_live_messages(srv: Server) -> None:
    async with connected(srv.ws) as writer, connected(srv.ws) as reader:
        await writer.join("replayed")
        for n in range(4):
            await writer.send("replayed", f"m{n}")
        joined = await reader.join("replayed", history=3)
        assert joined.offset == 4
        await writer.send("replayed", "live")
        texts = [(await next_of(reader, Chat))[0] for _ in range(4)]
        assert [(c.offset, c.text) for c in texts] == [
            (2, "m1"),
            (3, "m2"),
            (4, "m3"),
            (5, "live"),
        ]


async def test_connection_refused_is_a_typed_error() -> None:
    client = Client(f"ws://127.0.0.1:{free_port()}", timeout=3)
    with pytest.raises(ConnectionFailed) as failed:
        async with asyncio.timeout(TIMEOUT):
            await client.connect()
    assert failed.value.code == "connection_failed"


async def test_a_restart_under_the_client_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """SIGTERM (1012) and a new server on the same port with a durable history, while one
    client sends and another receives: every chat is acked once, the other client sees
    every message once, in offset order. One batch is certainly in flight at the 1012:
    the test holds the SQLite write lock, so the old server cannot store (nor ack) it."""
    db = tmp_path / "history.db"
    env = {"HISTORY_URL": f"sqlite:///{db}", "RATE_LIMIT": "5000"}
    server = start_server(env)
    room, per_batch = "restart", 5
    try:
        async with connected(server.ws) as sender, connected(server.ws) as receiver:
            await sender.join(room)
            await receiver.join(room)
            acks: list[Ack] = []
            chats: list[Chat] = []
            events: list[Event] = []

            async def send_batches(first: int, count: int) -> None:
                for batch in range(first, first + count):
                    texts = [f"{batch}:{n}" for n in range(per_batch)]
                    acks.extend(await asyncio.gather(*(sender.send(room, t) for t in texts)))

            async def receive(done: Callable[[], bool]) -> None:
                while not done():
                    event = await receiver.receive()
                    events.append(event)
                    if isinstance(event, Chat):
                        chats.append(event)

            watching = asyncio.create_task(
                receive(lambda: any(isinstance(e, Disconnected) for e in events))
            )
            async with asyncio.timeout(20):
                await send_batches(0, 4)
            lock = sqlite3.connect(db, isolation_level=None)
            try:
                lock.execute("BEGIN IMMEDIATE")  # the server's appends now wait
                stuck = asyncio.create_task(send_batches(4, 1))
                async with asyncio.timeout(20):
                    while sender.unanswered < per_batch:
                        await asyncio.sleep(0.01)
                restarting = asyncio.create_task(asyncio.to_thread(restart, server, env))
                async with asyncio.timeout(20):
                    await watching  # the 1012 went to every member in one turn
                assert sender.unanswered == per_batch
            finally:
                lock.rollback()  # the old server may now store the batch, never ack it
                lock.close()
            server = await restarting
            async with asyncio.timeout(60):
                await stuck
                await send_batches(5, 3)
                total = len(acks)
                await receive(lambda: len(chats) >= total)

            assert sorted(a.offset for a in acks) == list(range(1, total + 1))
            assert [c.offset for c in chats] == list(range(1, total + 1))
            by_offset = {a.offset: a for a in acks}
            assert len({c.text for c in chats}) == total
            assert all(by_offset[c.offset].room == room for c in chats)
            lost = [e for e in events if isinstance(e, Disconnected)]
            assert lost and lost[0].code == 1012, events
            assert any(isinstance(e, Reconnected) for e in events), events
            assert not any(isinstance(e, RecoveryFailed) for e in events), events
            assert sender.resent == per_batch  # the batch in flight at the 1012, same refs
            # The stable client id survived the reconnect: the same users, in the room.
            reconnected = next(e for e in events if isinstance(e, Reconnected))
            assert reconnected.welcome.user.id == public_id(receiver.client_id)
            presence = await sender.presence(room)
            assert {u.id for u in presence.users} == {
                public_id(sender.client_id),
                public_id(receiver.client_id),
            }
            # Nothing else arrives late (a duplicate would come right after).
            ack = await sender.send(room, "after")
            assert ack.offset == total + 1
            chat, before = await next_of(receiver, Chat)
            assert (chat.offset, chat.text) == (total + 1, "after"), before
    finally:
        server.terminate()


async def test_lost_history_on_restart_is_reported_as_recovery_failed() -> None:
    """Memory history: the restarted server has a new epoch, so the rejoin answers
    `recovered: false` and the client yields RecoveryFailed (the caller reloads)."""
    server = start_server()
    try:
        async with connected(server.ws) as client:
            first = await client.join("lost")
            await client.send("lost", "before")
            await next_of(client, Chat)
            server = await asyncio.to_thread(restart, server, {})
            failed, before = await next_of(client, RecoveryFailed, within=30)
            assert failed.room == "lost" and failed.joined.recovered is False
            assert failed.joined.epoch != first.epoch
            assert any(isinstance(e, Disconnected) and e.code == 1012 for e in before)
            assert any(isinstance(e, Reconnected) for e in before)
            # Still joined, from the new epoch on: offset 1 again, delivered once.
            assert (await client.send("lost", "after")).offset == 1
            chat, _ = await next_of(client, Chat)
            assert (chat.epoch, chat.offset, chat.text) == (failed.joined.epoch, 1, "after")
    finally:
        server.terminate()


SECRET = "client-test-secret-of-at-least-32-bytes"


@pytest.fixture(scope="module")
def jwt_srv() -> Iterator[Server]:
    server = start_server({"JWT_SECRET": SECRET})
    yield server
    server.terminate()


async def test_token_refresh_keeps_the_connection_past_the_first_exp(jwt_srv: Server) -> None:
    first = mint_token(SECRET, "ann", name="Ann", ttl=3)
    expires = time.time() + 3
    refreshed = asyncio.Event()

    async def refresh() -> str:
        refreshed.set()
        return mint_token(SECRET, "ann", name="Ann", ttl=60)

    async with connected(jwt_srv.ws, token=first, token_refresh=refresh) as client:
        assert client.welcome is not None and client.welcome.user.name == "Ann"
        await client.join("tokens")
        async with asyncio.timeout(TIMEOUT):
            await refreshed.wait()
        # The duration is the property under test: alive after the first token's exp.
        await asyncio.sleep(max(0.0, expires - time.time()) + 1.5)
        assert (await client.send("tokens", "still here")).offset == 1
        chat, before = await next_of(client, Chat)
        assert chat.text == "still here"
        assert not any(isinstance(e, Disconnected | Reconnected) for e in before), before


async def test_after_4401_the_client_reconnects_with_a_refreshed_token(jwt_srv: Server) -> None:
    """The refresh before `exp` fails, so the server closes with 4401; the client asks
    token_refresh again before reconnecting, and recovers the room."""
    calls: list[float] = []

    async def refresh() -> str:
        calls.append(time.time())
        if len(calls) == 1:
            raise RuntimeError("the token service is down for a moment")
        return mint_token(SECRET, "cat", name="Cat", ttl=60)

    token = mint_token(SECRET, "cat", name="Cat", ttl=2)
    async with connected(jwt_srv.ws, token=token, token_refresh=refresh) as client:
        await client.join("renewed")
        lost, _ = await next_of(client, Disconnected)
        assert lost.code == 4401
        await next_of(client, Reconnected)
        assert len(calls) == 2 and client.token != token
        assert (await client.send("renewed", "back")).offset == 1
        chat, before = await next_of(client, Chat)
        assert chat.text == "back" and not any(isinstance(e, RecoveryFailed) for e in before)


async def test_a_bad_token_is_unauthorized_and_an_expired_one_ends_iteration(
    jwt_srv: Server,
) -> None:
    client = Client(jwt_srv.ws, token="not-a-jwt", timeout=TIMEOUT)
    with pytest.raises(Unauthorized) as refused:
        async with asyncio.timeout(TIMEOUT):
            await client.connect()
    assert refused.value.close_code == 4401 and refused.value.code == "unauthorized"

    async with connected(jwt_srv.ws, token=mint_token(SECRET, "bob", ttl=2)) as client:
        await client.join("tokens")
        with pytest.raises(Unauthorized) as expired:
            await next_of(client, Chat)  # nothing comes: the token expires first
        assert expired.value.close_code == 4401
        with pytest.raises(Unauthorized):
            await client.send("tokens", "too late")


async def test_heartbeat_pings_a_silent_server_and_reconnects_when_it_stops_answering() -> None:
    server = start_server({"HEARTBEAT_SECONDS": "1"})
    stopped = False
    try:
        async with connected(server.ws, backoff=(0.1, 0.5)) as client:
            client.timeout = 3.0  # reconnect attempts to a stopped server give up soon
            await client.join("beat")
            deadline = time.monotonic() + TIMEOUT
            while client.heartbeat.pongs_received < 2:  # the server says nothing: pings get pongs
                assert time.monotonic() < deadline, (
                    client.heartbeat.pings_sent,
                    client.heartbeat.pongs_received,
                )
                await asyncio.sleep(0.1)  # polling interval, bounded by the deadline
            # A server that answers nothing at all (stopped): the client gives up on
            # the connection after a heartbeat without a pong, and reconnects later.
            os.kill(server.process.pid, signal.SIGSTOP)
            stopped = True
            lost, _ = await next_of(client, Disconnected)
            assert lost.code is None or lost.code == 1006, lost
            os.kill(server.process.pid, signal.SIGCONT)
            stopped = False
            await next_of(client, Reconnected, within=30)
            assert (await client.send("beat", "back")).offset == 1
    finally:
        if stopped:
            os.kill(server.process.pid, signal.SIGCONT)
        server.terminate()


async def test_readme_client_example_runs(srv: Server, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's "Python client" example, as written, against a real server."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "Client(url" in b)
    assert example.rstrip().endswith("asyncio.run(main())")
    namespace: dict[str, Any] = {"__name__": "readme_client"}
    exec(
        compile(example.rstrip().removesuffix("asyncio.run(main())"), str(README), "exec"),
        namespace,
    )
    async with connected(srv.ws) as other:
        await other.join("lobby")
        await other.send("lobby", "before ann")
        async with asyncio.timeout(TIMEOUT):
            await namespace["main"](srv.ws)
    printed = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"#\d+ guest-\w+: before ann", printed[-2]), printed
    assert re.fullmatch(r"#\d+ ann: hello", printed[-1]), printed


async def test_a_client_that_stops_reading_is_closed_4408_and_recovers_everything() -> None:
    """Backpressure: with the iterator not read, the client stops reading the socket, the
    server closes it as a slow consumer (4408); read again, it reconnects with `since` and
    yields every message once, in order."""
    # Incompressible (permessage-deflate is on): few frames fill the socket buffers.
    big = base64.b64encode(os.urandom(44_990)).decode()
    server = start_server(
        {
            "OUTBOX_SIZE": "16",
            "MAX_TEXT_CHARS": "60000",
            "MAX_MESSAGE_BYTES": "61000",
            "RATE_LIMIT": "5000",
        }
    )
    count = 200
    try:
        async with connected(server.ws) as writer, connected(server.ws, max_queue=1) as slow:
            await slow.join("slow")
            await writer.join("slow")
            async with asyncio.timeout(60):
                for n in range(count):
                    await writer.send("slow", f"{n}:{big}")
            offsets: list[int] = []
            events: list[Event] = []
            async with asyncio.timeout(60):
                while len(offsets) < count:
                    event = await slow.receive()
                    events.append(event)
                    if isinstance(event, Chat):
                        offsets.append(event.offset)
                        assert event.text.startswith(f"{event.offset - 1}:")
            assert offsets == list(range(1, count + 1))
            closes = [e.code for e in events if isinstance(e, Disconnected)]
            assert closes == [4408], closes
            assert not any(isinstance(e, RecoveryFailed) for e in events)
    finally:
        server.terminate()
