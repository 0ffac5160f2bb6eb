"""Several roomcast processes (workers or dynos) behind one Redis: one room."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator

import pytest

from ..brokers import fresh_database, start_redis
from ..servers import Server, start_server
from ..support import Client, Message, client, get

ROOM = "shared"


def shared_env(request: pytest.FixtureRequest, backend: str) -> dict[str, str]:
    """Settings for servers sharing rooms through `backend` (as two dynos would)."""
    tag = f"t{uuid.uuid4().hex[:12]}"
    env = {"RATE_LIMIT": "5000", "PRESENCE_TTL": "2"}
    redis = f"{request.getfixturevalue('redis_url')}?prefix={tag}"
    if backend == "redis":
        env["BROADCAST_URL"] = redis
    elif backend == "postgres":
        env["BROADCAST_URL"] = asyncio.run(fresh_database(request.getfixturevalue("postgres_url")))
    else:  # Kafka carries broadcasts only: history (and presence) in Redis
        env["BROADCAST_URL"] = request.getfixturevalue("kafka_url")
        env["HISTORY_URL"] = redis
    return env


@contextlib.contextmanager
def two_servers(env: dict[str, str]) -> Iterator[tuple[Server, Server]]:
    first = start_server(env)
    try:
        second = start_server(env)
        try:
            yield first, second
        finally:
            second.terminate()
    finally:
        first.terminate()


@pytest.fixture(params=["redis", "postgres", "kafka"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Server, Server]]:
    """Two servers sharing one broker, on each broadcast backend."""
    with two_servers(shared_env(request, request.param)) as servers:
        yield servers


@pytest.fixture
def redis_pair(request: pytest.FixtureRequest) -> Iterator[tuple[Server, Server]]:
    with two_servers(shared_env(request, "redis")) as servers:
        yield servers


async def chats_until(conn: Client, last: int, within: float = 20) -> list[Message]:
    found: list[Message] = []
    async with asyncio.timeout(within):
        while not found or found[-1]["offset"] < last:
            frame = await conn.recv(within)
            if frame["type"] == "chat":
                found.append(frame)
    return found


async def test_clients_on_two_servers_share_a_room_with_one_offset_order(
    pair: tuple[Server, Server],
) -> None:
    one, two = pair
    async with client(one) as ann, client(two) as bob:
        await ann.join(ROOM)
        await bob.join(ROOM)
        await ann.recv_type("system", event="join", user=bob.user)  # across servers
        ack, _ = await ann.chat("from one", room=ROOM)
        got = await chats_until(bob, ack["offset"])
        assert [(c["offset"], c["text"]) for c in got] == [(1, "from one")]
        ack, _ = await bob.chat("from two", room=ROOM)
        assert ack["offset"] == 2
        got = await chats_until(ann, 2)
        assert [(c["offset"], c["text"]) for c in got] == [(2, "from two")]


async def test_concurrent_senders_on_both_servers_give_every_client_one_gapless_order(
    pair: tuple[Server, Server],
) -> None:
    one, two = pair
    per_sender = 40

    async def sender(server: Server, name: str) -> None:
        async with client(server) as conn:
            await conn.join(ROOM)
            await conn.pour(ROOM, [f"{name}:{n}" for n in range(per_sender)])

    async with client(one) as watch_one, client(two) as watch_two:
        await watch_one.join(ROOM)
        await watch_two.join(ROOM)
        names = ["a", "b", "c", "d"]
        await asyncio.gather(*(sender(one if i % 2 else two, name) for i, name in enumerate(names)))
        total = per_sender * len(names)
        for watcher in (watch_one, watch_two):
            got = await chats_until(watcher, total)
            assert [c["offset"] for c in got] == list(range(1, total + 1))
            for name in names:
                mine = [c["text"] for c in got if c["text"].startswith(f"{name}:")]
                assert mine == [f"{name}:{n}" for n in range(per_sender)]


async def test_recovery_works_on_the_other_server(pair: tuple[Server, Server]) -> None:
    one, two = pair
    async with client(one) as writer:
        joined = await writer.join(ROOM)
        for n in range(5):
            await writer.chat(f"m{n}", room=ROOM)
        since = f"{joined['epoch']}:2"
        async with client(two, f"/ws/{ROOM}", since=since) as back:
            assert [f["offset"] for f in await back.recv_many(3)] == [3, 4, 5]
            await back.recv_type("joined", recovered=True, offset=5)


async def ready(server: Server) -> bool:
    status, _ = await get(server, "/readyz")
    return status == 200


async def wait_ready(server: Server, want: bool, within: float = 20) -> None:
    async with asyncio.timeout(within):
        while await ready(server) != want:
            await asyncio.sleep(0.05)  # polling /readyz, bounded by the timeout


async def test_a_redis_outage_loses_and_duplicates_no_acknowledged_message() -> None:
    redis = start_redis(durable=True)
    env = {"BROADCAST_URL": redis.url, "RATE_LIMIT": "5000"}
    one = start_server(env)
    two = start_server(env)
    try:
        acked: dict[str, int] = {}
        refused: list[str] = []
        stop = asyncio.Event()

        async def chatter() -> None:
            """Sends one chat at a time and re-sends it with the same ref until acknowledged."""
            async with client(one) as conn:
                await conn.join(ROOM)
                n = 0
                while not stop.is_set():
                    ref = f"c{n}"
                    await conn.send({"type": "chat", "room": ROOM, "text": ref, "ref": ref})
                    while True:
                        frame = await conn.recv(20)
                        if frame["type"] == "ack" and frame["ref"] == ref:
                            acked[ref] = frame["offset"]
                            n += 1
                            break
                        if frame["type"] == "error" and frame["ref"] == ref:
                            assert frame["code"] == "internal", frame
                            refused.append(ref)
                            break  # the store is down: the same ref goes again

        async with client(two) as reader:
            await reader.join(ROOM)
            chatting = asyncio.create_task(chatter())
            async with asyncio.timeout(20):
                while len(acked) < 20:
                    await asyncio.sleep(0.01)  # let traffic build up before the outage
            redis.stop(keep_data=True)
            await wait_ready(one, False)
            await wait_ready(two, False)
            before_restart = len(acked)
            redis = start_redis(restart=redis, durable=True)
            await wait_ready(one, True)
            await wait_ready(two, True)
            async with asyncio.timeout(20):
                while len(acked) < before_restart + 20:
                    await asyncio.sleep(0.01)
            stop.set()
            await asyncio.wait_for(chatting, 20)
            last = max(acked.values())
            got = await chats_until(reader, last)
        assert refused, "no chat was sent while Redis was down: the outage was not exercised"
        offsets = [c["offset"] for c in got]
        assert offsets == list(range(1, last + 1)), "a gap or a duplicate after the outage"
        texts = {c["text"]: c["offset"] for c in got}
        assert all(texts[ref] == offset for ref, offset in acked.items())
    finally:
        one.terminate()
        two.terminate()
        redis.stop()


def test_serve_runs_several_workers_on_a_shared_backend(redis_url: str) -> None:
    env = {"BROADCAST_URL": f"{redis_url}?prefix=w{uuid.uuid4().hex[:12]}", "WEB_CONCURRENCY": "2"}
    server = start_server(env)
    try:

        async def chat_among_many() -> None:
            async with contextlib.AsyncExitStack() as stack:
                members = [await stack.enter_async_context(client(server)) for _ in range(8)]
                for member in members:
                    await member.join(ROOM)
                await members[0].send({"type": "chat", "room": ROOM, "text": "to all workers"})
                for member in members:
                    got = await chats_until(member, 1)
                    assert [c["text"] for c in got] == ["to all workers"]

        asyncio.run(chat_among_many())
        assert server.log().count("Started server process") == 2, server.log()
    finally:
        server.terminate()


async def test_a_crashed_servers_users_leave_presence_within_presence_ttl(
    pair: tuple[Server, Server],
) -> None:
    one, two = pair
    async with client(one) as ann:
        await ann.join(ROOM)
        async with client(two) as bob:
            await bob.join(ROOM)
            await ann.recv_type("system", event="join", online=2)
            two.process.kill()  # SIGKILL: no clean-up, its presence lease just expires
            two.process.wait(10)
            # The requirement is the bound: PRESENCE_TTL (2 s) plus slack for a loaded machine.
            async with asyncio.timeout(2 + 2):
                while True:
                    await ann.send({"type": "presence", "room": ROOM, "ref": "p"})
                    frame = await ann.drain_until(lambda f: f["type"] == "presence")
                    if frame[-1]["online"] == 1:
                        break
                    await asyncio.sleep(0.2)  # polling presence, bounded by the timeout
            assert [u["id"] for u in frame[-1]["users"]] == [ann.user["id"]]


async def test_presence_covers_every_server(pair: tuple[Server, Server]) -> None:
    one, two = pair
    async with client(one) as ann, client(two) as bob:
        await ann.join(ROOM)
        joined = await bob.join(ROOM)
        assert joined["online"] == 2
        assert {u["id"] for u in joined["presence"]} == {ann.user["id"], bob.user["id"]}
        await ann.recv_type("system", event="join", user=bob.user, online=2)


def test_postgres_refuses_an_envelope_over_the_notify_limit_before_storing_it(
    request: pytest.FixtureRequest,
) -> None:
    async def exchange(one: Server, two: Server) -> None:
        async with client(one) as ann, client(two) as bob:
            await ann.join(ROOM)
            await bob.join(ROOM)
            await ann.recv_type("system")
            text = "€" * 2700  # 2,700 characters (under MAX_TEXT_CHARS), 8,100 bytes
            await ann.send({"type": "chat", "room": ROOM, "text": text, "ref": "big"})
            error = await ann.recv_type("error", code="text_too_long", ref="big")
            assert "bytes" in error["detail"], error
            # Nothing was stored: the next chat gets offset 1, and bob sees only it.
            ack, _ = await ann.chat("small", room=ROOM)
            assert ack["offset"] == 1
            assert [c["text"] for c in await chats_until(bob, 1)] == ["small"]

    with two_servers(shared_env(request, "postgres")) as (one, two):
        asyncio.run(exchange(one, two))
