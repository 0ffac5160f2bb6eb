"""History and recovery end to end: nothing is lost or duplicated across reconnects."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..brokers import fresh_database
from ..servers import Server, start_server
from ..support import Client, Message, client
from .test_slow_consumer import read_frame, stalled_socket

HISTORY = 300


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    server = start_server({"HISTORY_SIZE": str(HISTORY), "OUTBOX_SIZE": "16", "RATE_LIMIT": "5000"})
    yield server
    server.terminate()


async def chats(conn: Client, count: int, within: float = 10) -> list[Message]:
    """The next `count` chat frames, skipping acks and presence events."""
    found: list[Message] = []
    async with asyncio.timeout(within):
        while len(found) < count:
            frame = await conn.recv(within)
            if frame["type"] == "chat":
                found.append(frame)
    return found


async def send_acked(conn: Client, room: str, texts: list[str]) -> list[int]:
    """Send chats, a few at a time (each costs an ack and an own copy in the
    sender's outbox of 16), and wait for every ack; returns their offsets."""
    offsets: list[int] = []
    async with asyncio.timeout(20):
        for start in range(0, len(texts), 5):
            batch = texts[start : start + 5]
            for text in batch:
                await conn.send(
                    {"type": "chat", "room": room, "text": text, "ref": uuid.uuid4().hex}
                )
            acked = 0
            while acked < len(batch):
                frame = await conn.recv()
                if frame["type"] == "ack":
                    offsets.append(frame["offset"])
                    acked += 1
    return offsets


async def test_since_replays_exactly_what_was_missed(srv: Server) -> None:
    async with client(srv) as writer:
        first = await writer.join("since")
        await send_acked(writer, "since", [f"m{n}" for n in range(5)])
        async with client(srv) as late:
            await late.send(
                {"type": "join", "room": "since", "since": {"epoch": first["epoch"], "offset": 2}}
            )
            replay = await late.recv_many(3)
            assert [(f["type"], f["offset"], f["text"]) for f in replay] == [
                ("chat", 3, "m2"),
                ("chat", 4, "m3"),
                ("chat", 5, "m4"),
            ]
            joined = await late.recv_type("joined", room="since", recovered=True, offset=5)
            assert joined["epoch"] == first["epoch"]
            # Live delivery follows the replay without a gap.
            await send_acked(writer, "since", ["live"])
            assert [(c["offset"], c["text"]) for c in await chats(late, 1)] == [(6, "live")]


async def test_history_replays_the_last_n(srv: Server) -> None:
    async with client(srv) as writer:
        await writer.join("hist")
        await send_acked(writer, "hist", [f"h{n}" for n in range(6)])
        async with client(srv) as reader:
            await reader.send({"type": "join", "room": "hist", "history": 2, "ref": "j"})
            assert [f["offset"] for f in await reader.recv_many(2)] == [5, 6]
            await reader.recv_type("joined", recovered=False, offset=6, ref="j")


async def test_query_since_and_history_on_the_room_path(srv: Server) -> None:
    async with client(srv) as writer:
        joined = await writer.join("query")
        await send_acked(writer, "query", [f"q{n}" for n in range(4)])
        async with client(srv, "/ws/query", history="3") as reader:
            assert [f["offset"] for f in await reader.recv_many(3)] == [2, 3, 4]
            await reader.recv_type("joined", room="query", recovered=False, offset=4)
        since = f"{joined['epoch']}:1"
        async with client(srv, "/ws/query", since=since) as reader:
            assert [f["offset"] for f in await reader.recv_many(3)] == [2, 3, 4]
            await reader.recv_type("joined", room="query", recovered=True, offset=4)


async def test_since_with_another_epoch_or_a_trimmed_gap_recovers_nothing(srv: Server) -> None:
    async with client(srv) as writer:
        joined = await writer.join("lost")
        await send_acked(writer, "lost", [f"x{n}" for n in range(HISTORY + 5)])
        async with client(srv) as reader:
            await reader.send(
                {"type": "join", "room": "lost", "since": {"epoch": "old", "offset": 1}}
            )
            await reader.recv_type("joined", recovered=False, offset=HISTORY + 5)
        async with client(srv) as reader:
            since = {"epoch": joined["epoch"], "offset": 1}  # offset 2 was trimmed
            await reader.send({"type": "join", "room": "lost", "since": since})
            # Never a partial replay: nothing at all, and recovered false.
            await reader.recv_type("joined", recovered=False, offset=HISTORY + 5)
        async with client(srv) as reader:
            since = {"epoch": joined["epoch"], "offset": 5}  # exactly the retained window
            await reader.send({"type": "join", "room": "lost", "since": since})
            replay = await reader.recv_many(HISTORY)
            assert [f["offset"] for f in replay] == list(range(6, HISTORY + 6))
            await reader.recv_type("joined", recovered=True)


async def test_a_repeated_ref_is_acknowledged_again_and_stored_once(srv: Server) -> None:
    async with client(srv, client="idem-user") as writer, client(srv) as other:
        await writer.join("idem")
        await other.join("idem")
        await writer.recv_type("system")  # other joined: nothing else is pending
        message = {"type": "chat", "room": "idem", "text": "once", "ref": "same"}
        await writer.send(message)
        ack, _ = await writer.ack_and_chat("once", "same")
        await writer.send(message)
        again = await writer.recv_type("ack", ref="same")
        assert again["offset"] == ack["offset"]
        await writer.chat("next", room="idem", ref="other")
        got = await chats(other, 2)
        assert [(c["text"], c["offset"]) for c in got] == [
            ("once", ack["offset"]),
            ("next", ack["offset"] + 1),
        ]
    # The same ref from the same user on a new connection (client id kept) is still known.
    async with client(srv, client="idem-user") as writer:
        await writer.join("idem")
        await writer.send({"type": "chat", "room": "idem", "text": "once", "ref": "same"})
        assert (await writer.recv_type("ack", ref="same"))["offset"] == ack["offset"]


async def test_a_killed_client_gets_exactly_the_100_it_missed(srv: Server) -> None:
    async with client(srv) as writer:
        joined = await writer.join("killed")
        await send_acked(writer, "killed", [f"a{n}" for n in range(10)])
        victim = stalled_socket(srv, "/ws/killed")
        # A network drop: a TCP reset, no close frame.
        victim.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        victim.close()
        await send_acked(writer, "killed", [f"b{n}" for n in range(100)])
        since = f"{joined['epoch']}:10"
        async with client(srv, "/ws/killed", since=since) as back:
            replay = await back.recv_many(100)
            assert [f["offset"] for f in replay] == list(range(11, 111))
            assert [f["text"] for f in replay] == [f"b{n}" for n in range(100)]
            await back.recv_type("joined", recovered=True, offset=110)


async def test_a_slow_consumer_closed_with_4408_reconnects_and_loses_nothing() -> None:
    room = "slowrecover"
    big = "s" * 60_000  # few frames fill the socket buffers, so the outbox overflows soon
    slow_srv = start_server(
        {
            "OUTBOX_SIZE": "16",
            "MAX_TEXT_CHARS": "60000",
            "MAX_MESSAGE_BYTES": "61000",
            "RATE_LIMIT": "5000",
        }
    )
    try:
        async with client(slow_srv) as writer:
            joined = await writer.join(room)
            stalled = stalled_socket(slow_srv, f"/ws/{room}")
            try:
                await send_acked(writer, room, [big] * 200)
                # It reads again: everything the server wrote before giving up, then 4408.
                stalled.settimeout(20)
                last = 0
                while (frame := await asyncio.to_thread(read_frame, stalled))[0] != 0x8:
                    envelope = json.loads(frame[1])
                    if envelope["type"] == "chat":
                        assert envelope["offset"] == last + 1
                        last = envelope["offset"]
                assert int.from_bytes(frame[1][:2], "big") == 4408
                assert last < 200
            finally:
                stalled.close()
            # It reconnects promptly with the last offset it saw and loses nothing.
            async with client(slow_srv, f"/ws/{room}", since=f"{joined['epoch']}:{last}") as back:
                replay = await back.recv_many(200 - last, within=20)
                assert [f["offset"] for f in replay] == list(range(last + 1, 201))
                await back.recv_type("joined", recovered=True, offset=200)
                await send_acked(writer, room, ["after"])
                assert [c["offset"] for c in await chats(back, 1)] == [201]
    finally:
        slow_srv.terminate()


@pytest.fixture(scope="module", params=["memory", "sqlite", "redis", "postgres"])
def roomy(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """Default outboxes (live frames queue behind a replay while it streams), on each store."""
    store = request.param
    if store == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('seam') / 'history.db'}"
    elif store == "redis":
        url = f"{request.getfixturevalue('redis_url')}?prefix=seam-{uuid.uuid4().hex}"
    elif store == "postgres":
        url = asyncio.run(fresh_database(request.getfixturevalue("postgres_url")))
    else:
        url = "memory://"
    server = start_server({"RATE_LIMIT": "5000", "HISTORY_URL": url})
    yield server
    server.terminate()


async def test_the_seam_between_replay_and_live_loses_and_duplicates_nothing(roomy: Server) -> None:
    """Several senders publish without pause while clients join with `since` at random points."""
    room = "seam"
    senders_count, per_sender, joiners = 3, 80, 8
    total = senders_count * per_sender
    async with client(roomy) as first:
        epoch = (await first.join(room))["epoch"]
        last_seen = [0]

        async def sender(index: int) -> None:
            async with client(roomy) as conn:
                await conn.join(room)
                await conn.pour(room, [f"{index}:{n}" for n in range(per_sender)])

        async def joiner(index: int) -> list[int]:
            await asyncio.sleep(random.uniform(0, 0.5))  # a random moment to join, not a sync point
            since = last_seen[0]
            async with client(roomy, f"/ws/{room}", since=f"{epoch}:{since}") as conn:
                offsets: list[int] = []
                async with asyncio.timeout(30):
                    while (offsets[-1] if offsets else since) < total:
                        frame = await conn.recv(30)
                        if frame["type"] == "chat":
                            offsets.append(frame["offset"])
                        elif frame["type"] == "joined":
                            assert frame["recovered"] is True, frame
                assert offsets == list(range(since + 1, total + 1)), f"joiner {index} at {since}"
                return offsets

        async def watch() -> None:
            while last_seen[0] < total:
                frame = await first.recv(30)
                if frame["type"] == "chat":
                    assert frame["offset"] == last_seen[0] + 1
                    last_seen[0] = frame["offset"]

        watcher = asyncio.create_task(watch())
        results = await asyncio.gather(
            *(sender(i) for i in range(senders_count)), *(joiner(i) for i in range(joiners))
        )
        await watcher
        starts = sorted(r[0] if r else total + 1 for r in results[senders_count:])
        assert any(1 < start <= total for start in starts), f"no joiner joined mid-stream: {starts}"


def test_restart_on_the_memory_store_changes_the_epoch() -> None:
    server = start_server()
    try:

        async def before() -> str:
            async with client(server) as conn:
                joined = await conn.join("r")
                await conn.chat("before restart", room="r")
                return str(joined["epoch"])

        epoch = asyncio.run(before())
    finally:
        server.terminate()
    server = start_server()
    try:

        async def after() -> Message:
            async with client(server) as conn:
                await conn.send(
                    {"type": "join", "room": "r", "since": {"epoch": epoch, "offset": 1}}
                )
                return await conn.recv_type("joined")

        joined = asyncio.run(after())
        assert joined["recovered"] is False and joined["epoch"] != epoch
    finally:
        server.terminate()


def test_restart_on_the_sqlite_store_recovers(tmp_path: Path) -> None:
    env = {"HISTORY_URL": f"sqlite:///{tmp_path / 'history.db'}"}
    server = start_server(env)
    try:

        async def before() -> str:
            async with client(server) as conn:
                joined = await conn.join("r")
                for n in range(3):
                    await conn.chat(f"before {n}", room="r")
                return str(joined["epoch"])

        epoch = asyncio.run(before())
    finally:
        server.terminate()
    server = start_server(env)
    try:

        async def after() -> None:
            async with client(server, "/ws/r", since=f"{epoch}:1") as conn:
                replay = await conn.recv_many(2)
                assert [(f["offset"], f["text"]) for f in replay] == [
                    (2, "before 1"),
                    (3, "before 2"),
                ]
                await conn.recv_type("joined", room="r", recovered=True, epoch=epoch, offset=3)
                ack, _ = await conn.chat("after restart")
                assert ack["offset"] == 4

        asyncio.run(after())
    finally:
        server.terminate()
