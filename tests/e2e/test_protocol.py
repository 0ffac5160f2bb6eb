"""End-to-end tests of the wire protocol (PROTOCOL.md) against real servers.

Every frame received is validated against the server's /schema.json by the
helpers in support.py. Frames are checked in the order they arrive, except
where PROTOCOL.md leaves the order open (an ack and the sender's own chat).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import uuid
from collections.abc import Iterator
from contextlib import AsyncExitStack
from datetime import datetime
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from ..servers import Server, start_server
from ..support import (
    SUBPROTOCOL,
    Client,
    Message,
    client,
    counts,
    get,
    room_client,
    room_of,
    wait_counts,
)

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def fresh(prefix: str = "room") -> str:
    """A room name no other test uses (the default server is shared by the session)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def assert_ts(value: str) -> None:
    assert RFC3339.match(value), value
    assert datetime.fromisoformat(value.replace("Z", "+00:00")).tzinfo is not None


def _serve(env: dict[str, str]) -> Iterator[Server]:
    srv = start_server(env)
    yield srv
    srv.terminate()


@pytest.fixture(scope="module")
def names_server() -> Iterator[Server]:
    yield from _serve({"MAX_NAME_CHARS": "8", "HEARTBEAT_SECONDS": "7"})


@pytest.fixture(scope="module")
def presence_server() -> Iterator[Server]:
    yield from _serve({"PRESENCE_EVENTS_MAX": "2", "PRESENCE_LIST_MAX": "2"})


@pytest.fixture(scope="module")
def limits_server() -> Iterator[Server]:
    # RATE_LIMIT is high so that the bad-frame tests are not rate limited.
    yield from _serve(
        {
            "MAX_ROOMS": "2",
            "MAX_TEXT_CHARS": "10",
            "MAX_MESSAGE_BYTES": "1024",
            "RATE_LIMIT": "1000",
        }
    )


@pytest.fixture(scope="module")
def rate_server() -> Iterator[Server]:
    yield from _serve({"RATE_LIMIT": "5"})


@pytest.fixture(scope="module")
def connections_server() -> Iterator[Server]:
    yield from _serve({"MAX_CONNECTIONS": "3"})


@pytest.fixture(scope="module")
def quiet_server() -> Iterator[Server]:
    """Default settings, used only by tests that count its connections in /metrics."""
    yield from _serve({})


# --- welcome ---------------------------------------------------------------------


def assert_welcome(welcome: Message, heartbeat: int = 25) -> None:
    assert welcome["type"] == "welcome"
    assert isinstance(welcome["conn"], str) and welcome["conn"]
    assert set(welcome["user"]) == {"id", "name"}
    assert welcome["user"]["id"] and welcome["user"]["name"]
    assert welcome["protocol"] == 1
    assert welcome["heartbeat"] == heartbeat


async def test_welcome_first_frame_on_ws(server: Server) -> None:
    async with client(server, welcome=False) as first, client(server, welcome=False) as second:
        one = await first.recv()
        two = await second.recv()
        assert_welcome(one)
        assert_welcome(two)
        assert one["conn"] != two["conn"]
        await first.ping()


async def test_welcome_first_frame_on_room_path(server: Server) -> None:
    room = fresh()
    async with room_client(server, room) as writer:
        await writer.chat("one")
        await writer.chat("two")
    async with client(server, f"/ws/{room}", welcome=False, history="2") as c:
        assert_welcome(await c.recv())
        assert [m["text"] for m in await c.recv_many(2)] == ["one", "two"]
        await c.recv_type("joined", room=room, offset=2)
    async with client(server, f"/ws/{fresh()}", welcome=False) as c:
        assert_welcome(await c.recv())
        await c.recv_type("joined")


async def test_welcome_heartbeat_follows_setting(names_server: Server) -> None:
    async with client(names_server) as c:
        assert_welcome(c.welcome, heartbeat=7)


# --- subprotocol ---------------------------------------------------------------------


async def test_subprotocol_roomcast_v1_selected(server: Server) -> None:
    async with client(server, subprotocols=[SUBPROTOCOL]) as c:
        assert c.subprotocol == SUBPROTOCOL
        await c.ping()
    async with client(server, subprotocols=["roomcast.token.abc", SUBPROTOCOL]) as c:
        assert c.subprotocol == SUBPROTOCOL
        await c.ping()


async def test_subprotocol_none_offered_works(server: Server) -> None:
    async with client(server, subprotocols=None) as c:
        assert c.subprotocol is None
        await c.ping()
    async with client(server, f"/ws/{fresh()}", subprotocols=None) as c:
        assert c.subprotocol is None
        await c.recv_type("joined")
        await c.chat("no subprotocol")


# --- identity --------------------------------------------------------------------------


def public_id(client_id: str) -> str:
    """PROTOCOL.md, Identity: the public id derived from the secret `client`."""
    return "anon-" + hashlib.sha256(client_id.encode()).hexdigest()[:20]


async def test_identity_valid_client_derives_a_stable_user_id(server: Server) -> None:
    for client_id in ("abc-DEF_123", "x", "a" * 64):
        async with client(server, client=client_id, username="Named") as c:
            assert c.user == {"id": public_id(client_id), "name": "Named"}
        async with client(server, client=client_id) as again:  # a reconnect: the same id
            assert again.user["id"] == public_id(client_id)


async def test_identity_invalid_client_gets_fresh_id(server: Server) -> None:
    ids = []
    for client_id in ("bad id!", "a" * 65, "", "café", None, None):
        async with client(server, client=client_id) as c:
            assert c.user["id"] and c.user["id"] != client_id
            ids.append(c.user["id"])
    assert len(set(ids)) == len(ids), ids


async def test_identity_username_sanitized(names_server: Server) -> None:
    async with client(names_server, username="Al\x00i\x1bce\x7f\nWonderland") as c:
        assert c.user["name"] == "AliceWon"
    async with client(names_server, username="Zoë") as c:
        assert c.user["name"] == "Zoë"
    async with client(names_server, username="\x01\x02") as c:
        assert c.user["name"].startswith("guest-")


async def test_identity_without_username_is_guest(server: Server) -> None:
    async with client(server) as c:
        assert c.user["name"].startswith("guest-")
    async with client(server, username="") as c:
        assert c.user["name"].startswith("guest-")


# --- /ws/{room} ------------------------------------------------------------------------


async def test_room_path_joins_room(server: Server) -> None:
    room = fresh()
    async with room_client(server, room, client="path-user", username="P") as c:
        joined = c.joined
        assert joined["offset"] == 0
        assert joined["recovered"] is False
        assert joined["online"] == 1
        assert joined["presence"] == [{"id": public_id("path-user"), "name": "P"}]
        assert isinstance(joined["epoch"], str) and joined["epoch"]
        await c.ping()


async def test_room_path_plain_text_becomes_chat(server: Server) -> None:
    room = fresh()
    async with room_client(server, room) as c:
        texts = ["hello world", "   leading spaces, no brace", "[1, 2]", "x {y}", '"quoted"']
        for offset, text in enumerate(texts, start=1):
            await c.send(text)
            ack, own = await c.ack_and_chat(text, ref=None)
            assert (own["room"], own["offset"], ack["offset"]) == (room, offset, offset)


async def test_room_path_chat_envelope_without_room_goes_to_path_room(server: Server) -> None:
    room = fresh()
    async with room_client(server, room) as c:
        ack, own = await c.chat("envelope", ref="e1")
        assert own["room"] == ack["room"] == room


async def test_room_path_brace_text_is_invalid_json(server: Server) -> None:
    async with room_client(server, fresh()) as c:
        for frame in ("{bad", "  {bad"):
            await c.send(frame)
            error = await c.recv_type("error", code="invalid_json", ref=None)
            assert error["detail"]
            await c.ping()


# --- chat --------------------------------------------------------------------------------


async def test_chat_reaches_every_member_including_sender(server: Server) -> None:
    room = fresh()
    async with room_of(server, room, 5) as members:
        for index, member in enumerate(members):
            await member.send({"type": "chat", "text": f"from {index}", "ref": f"ref-{index}"})
        for index, member in enumerate(members):
            frames = await member.recv_many(6)
            chats = [f for f in frames if f["type"] == "chat"]
            acks = [f for f in frames if f["type"] == "ack"]
            assert len(chats) == 5 and len(acks) == 1, frames
            assert [c["offset"] for c in chats] == [1, 2, 3, 4, 5]
            assert {c["text"] for c in chats} == {f"from {i}" for i in range(5)}
            own = next(c for c in chats if c["text"] == f"from {index}")
            assert own["user"] == member.user
            assert acks[0] == {
                "type": "ack",
                "ref": f"ref-{index}",
                "room": room,
                "offset": own["offset"],
            }


async def test_chat_ack_matches_own_chat(server: Server) -> None:
    room = fresh()
    async with room_client(server, room, client="acker", username="Acker") as c:
        ack, own = await c.chat("with ref", ref="ref-1")
        assert ack == {"type": "ack", "ref": "ref-1", "room": room, "offset": 1}
        assert own["epoch"] == c.joined["epoch"]
        assert own["user"] == {"id": public_id("acker"), "name": "Acker"}
        assert_ts(own["ts"])
        ack, own = await c.chat("without ref")
        assert ack["ref"] is None and ack["offset"] == own["offset"] == 2


async def test_chat_repeated_ref_acked_with_original_offset(server: Server) -> None:
    room = fresh()
    async with room_client(server, room, client="idem") as a, room_client(server, room) as b:
        await a.recv_type("system", event="join", user=b.user)
        first, _ = await a.chat("once", ref="same")
        await b.recv_type("chat", offset=first["offset"], text="once")
        await a.send({"type": "chat", "text": "once", "ref": "same"})
        await a.recv_type("ack", ref="same", room=room, offset=first["offset"])
        # Not stored or delivered again: the next chat has the next offset, for both.
        nxt, _ = await a.chat("next", ref="other")
        assert nxt["offset"] == first["offset"] + 1
        await b.recv_type("chat", offset=nxt["offset"], text="next")
    async with room_client(server, room, client="idem") as again:
        await again.send({"type": "chat", "text": "once", "ref": "same"})
        await again.recv_type("ack", ref="same", room=room, offset=first["offset"])


async def test_rooms_isolated(server: Server) -> None:
    a, b = fresh("a"), fresh("b")
    async with (
        room_client(server, a) as in_a,
        room_client(server, b) as in_b,
        client(server) as multiplexed,
    ):
        await multiplexed.join(b)
        await in_b.recv_type("system", room=b, event="join", user=multiplexed.user)
        await in_a.chat("only for a")
        # Published before b's chat: if it leaked, it would arrive first.
        _, chat_b = await in_b.chat("for b")
        await multiplexed.recv_type("chat", room=b, text="for b", offset=chat_b["offset"])
        await in_a.chat("again a")
        _, chat_b = await in_b.chat("again b")
        await multiplexed.recv_type("chat", room=b, text="again b", offset=chat_b["offset"])


# --- offsets -----------------------------------------------------------------------------


async def test_offsets_sequential_without_gaps(server: Server) -> None:
    room = fresh()
    async with room_client(server, room) as c:
        offsets = [(await c.chat(f"m{i}"))[1]["offset"] for i in range(3)]
        assert offsets == [1, 2, 3]
    async with room_client(server, room) as late:
        assert late.joined["offset"] == 3
        _, own = await late.chat("m3")
        assert own["offset"] == 4


async def test_offsets_concurrent_senders_in_order(server: Server) -> None:
    room = fresh()
    senders, each = 4, 25

    async def run(index: int, member: Client) -> list[Message]:
        for k in range(each):
            await member.send({"type": "chat", "text": f"{index}:{k}", "ref": f"{index}:{k}"})
        return await member.recv_many(senders * each + each, within=20)

    async with room_of(server, room, senders) as members:
        results = await asyncio.gather(*(run(i, m) for i, m in enumerate(members)))
    for index, frames in enumerate(results):
        chats = [f for f in frames if f["type"] == "chat"]
        acks = [f for f in frames if f["type"] == "ack"]
        assert len(acks) == each and len(chats) == senders * each, frames
        assert [c["offset"] for c in chats] == list(range(1, senders * each + 1))
        for sender in range(senders):
            mine = [c["text"] for c in chats if c["text"].startswith(f"{sender}:")]
            assert mine == [f"{sender}:{k}" for k in range(each)]
        assert [a["ref"] for a in acks] == [f"{index}:{k}" for k in range(each)]
        offset_of = {c["text"]: c["offset"] for c in chats}
        assert all(a["offset"] == offset_of[a["ref"]] for a in acks)


# --- system events -----------------------------------------------------------------------


async def test_system_join_announced_to_others_not_joiner(server: Server) -> None:
    room = fresh()
    async with (
        room_client(server, room, client="sys-a", username="A") as a,
        room_client(server, room, client="sys-b", username="B") as b,
    ):
        assert b.joined["online"] == 2
        assert sorted(u["id"] for u in b.joined["presence"]) == sorted(
            [public_id("sys-a"), public_id("sys-b")]
        )
        event = await a.recv_type(
            "system",
            room=room,
            event="join",
            user={"id": public_id("sys-b"), "name": "B"},
            online=2,
        )
        assert_ts(event["ts"])
        # The joiner's own announcement would precede its chat.
        _, own = await b.chat("hi")
        await a.recv_type("chat", offset=own["offset"], text="hi")


async def test_system_second_connection_not_announced(server: Server) -> None:
    room = fresh()
    async with (
        room_client(server, room, client="obs") as observer,
        room_client(server, room, client="dup", username="Dup") as first,
    ):
        await observer.recv_type("system", event="join", user=first.user, online=2)
        async with room_client(server, room, client="dup", username="Dup") as second:
            assert second.joined["online"] == 2
            assert sorted(u["id"] for u in second.joined["presence"]) == sorted(
                [public_id("dup"), public_id("obs")]
            )
            # An announcement of `second` would precede its chat.
            _, own = await second.chat("second connection")
            await observer.recv_type("chat", offset=own["offset"])
            await first.recv_type("chat", offset=own["offset"])
            await observer.send({"type": "presence", "room": room, "ref": "n"})
            await observer.recv_type("presence", online=2, ref="n")


async def test_system_leave_sent_when_last_connection_leaves(quiet_server: Server) -> None:
    server = quiet_server
    await wait_counts(server, connections=0)
    room = fresh()
    async with room_client(server, room, client="obs2") as observer:
        async with room_client(server, room, client="dup2") as first:
            await observer.recv_type("system", event="join", user=first.user, online=2)
            async with (
                room_client(server, room, client="dup2"),
                room_client(server, room, client="dup2") as third,
            ):
                # `third` leaves with `leave`, the other one by disconnecting.
                await third.send({"type": "leave", "room": room, "ref": "bye"})
                await third.recv_type("left", room=room, ref="bye")
            # Wait until the server has let both go (it settles presence in the same
            # step as the count): a wrong `system` leave would then precede this chat.
            await wait_counts(server, connections=2)
            _, own = await first.chat("still here")
            await observer.recv_type("chat", offset=own["offset"])
        await observer.recv_type("system", room=room, event="leave", user=first.user, online=1)
        _, own = await observer.chat("alone")
        assert own["offset"] == 2


async def test_presence_events_max_suppresses_system_events(presence_server: Server) -> None:
    room = fresh()
    async with (
        room_client(presence_server, room) as one,
        room_client(presence_server, room) as two,
    ):
        await one.recv_type("system", event="join", user=two.user, online=2)
        async with room_client(presence_server, room) as three:
            assert three.joined["online"] == 3
            _, own = await three.chat("three")
            await one.recv_type("chat", offset=own["offset"])
            await two.recv_type("chat", offset=own["offset"])
            await three.send({"type": "leave", "room": room})
            await three.recv_type("left", room=room, ref=None)
        _, own = await two.chat("two")
        await one.recv_type("chat", offset=own["offset"])
        await two.send({"type": "leave", "room": room})
        await two.recv_type("left", room=room)
        await one.recv_type("system", event="leave", user=two.user, online=1)


async def test_presence_list_max_caps_users_not_online(presence_server: Server) -> None:
    room = fresh()
    ids = {public_id("pl-1"), public_id("pl-2"), public_id("pl-3")}
    async with (
        room_client(presence_server, room, client="pl-1"),
        room_client(presence_server, room, client="pl-2"),
        room_client(presence_server, room, client="pl-3") as third,
    ):
        assert third.joined["online"] == 3
        assert len(third.joined["presence"]) == 2
        assert {u["id"] for u in third.joined["presence"]} <= ids
        await third.send({"type": "presence", "room": room, "ref": "who"})
        presence = await third.recv_type("presence", room=room, ref="who", online=3)
        assert len(presence["users"]) == 2
        assert {u["id"] for u in presence["users"]} <= ids


# --- presence, leave, ping ------------------------------------------------------------


async def test_presence_request_lists_users(server: Server) -> None:
    room = fresh()
    async with (
        room_client(server, room, client="pa", username="PA") as a,
        room_client(server, room, client="pb", username="PB"),
    ):
        await a.recv_type("system", event="join", online=2)
        await a.send({"type": "presence", "room": room, "ref": "who"})
        presence = await a.recv_type("presence", room=room, ref="who", online=2)
        assert sorted(presence["users"], key=lambda u: u["name"]) == [
            {"id": public_id("pa"), "name": "PA"},
            {"id": public_id("pb"), "name": "PB"},
        ]


async def test_presence_not_joined_is_error(server: Server) -> None:
    room = fresh()
    async with client(server) as c:
        await c.send({"type": "presence", "room": room, "ref": "np"})
        error = await c.recv_type("error", code="not_joined", ref="np", room=room)
        assert error["detail"]
        await c.ping()


async def test_leave_answers_left(server: Server) -> None:
    room = fresh()
    async with client(server) as c:
        await c.join(room, ref="j")
        await c.send({"type": "leave", "room": room, "ref": "l1"})
        await c.recv_type("left", room=room, ref="l1")
        await c.send({"type": "leave", "room": room, "ref": "l2"})
        await c.recv_type("left", room=room, ref="l2")
        never = fresh()
        await c.send({"type": "leave", "room": never})
        await c.recv_type("left", room=never, ref=None)


async def test_leave_stops_delivery(server: Server) -> None:
    r1, r2 = fresh(), fresh()
    async with client(server) as a, client(server) as b:
        await a.join(r1)
        await a.join(r2)
        await b.join(r1)
        await a.recv_type("system", room=r1, event="join", user=b.user)
        await b.join(r2)
        await a.recv_type("system", room=r2, event="join", user=b.user)
        await a.send({"type": "leave", "room": r1, "ref": "out"})
        await a.recv_type("left", room=r1, ref="out")
        await b.recv_type("system", room=r1, event="leave", user=a.user, online=1)
        await b.chat("after leave", room=r1)
        # Published after r1's chat: if r1's chat still reached `a`, it would come first.
        _, own = await b.chat("in r2", room=r2)
        await a.recv_type("chat", room=r2, text="in r2", offset=own["offset"])


async def test_ping_answers_pong(server: Server) -> None:
    async with client(server) as c:
        await c.send({"type": "ping", "ref": "abc"})
        assert await c.recv() == {"type": "pong", "ref": "abc"}
        await c.send({"type": "ping"})
        assert await c.recv() == {"type": "pong", "ref": None}


async def test_max_rooms_refuses_extra_join(limits_server: Server) -> None:
    a, b, third = fresh(), fresh(), fresh()
    async with client(limits_server) as c:
        await c.join(a)
        await c.join(b)
        await c.send({"type": "join", "room": third, "ref": "third"})
        error = await c.recv_type("error", code="too_many_rooms", ref="third")
        assert error["detail"]
        await c.ping()
        await c.chat("still in", room=a)
        await c.send({"type": "leave", "room": b})
        await c.recv_type("left", room=b)
        await c.join(third, ref="now")


# --- errors --------------------------------------------------------------------------------


async def test_error_invalid_json_keeps_connection(server: Server) -> None:
    async with client(server) as c:
        for frame in ("{bad", "not json", ""):
            await c.send(frame)
            error = await c.recv_type("error", code="invalid_json", ref=None)
            assert error["detail"]
            await c.ping()


async def test_error_invalid_message_missing_room(server: Server) -> None:
    async with client(server) as c:
        for request in (
            {"type": "join", "ref": "m1"},
            {"type": "chat", "text": "where to?", "ref": "m2"},
            {"type": "presence", "ref": "m3"},
        ):
            await c.send(request)
            error = await c.recv_type("error", code="invalid_message", ref=request["ref"])
            assert "`room`" in error["detail"], error
            await c.ping()


async def test_error_invalid_message_unknown_type(server: Server) -> None:
    async with client(server) as c:
        for request in ({"type": "shout", "ref": "u1"}, {"ref": "u2"}, {"type": 5, "ref": "u3"}):
            await c.send(request)
            error = await c.recv_type("error", code="invalid_message", ref=request["ref"])
            assert error["detail"]
            await c.ping()
        await c.send("[1, 2]")
        await c.recv_type("error", code="invalid_message", ref=None)
        await c.ping()


async def test_error_unsupported_frame_binary(server: Server) -> None:
    async with room_client(server, fresh()) as c:
        for frame in (b"\x00\x01", b'{"type": "ping", "ref": "b"}', b"hello"):
            await c.send(frame)
            error = await c.recv_type("error", code="unsupported_frame")
            assert error["detail"]
            await c.ping()


async def test_error_invalid_room(server: Server) -> None:
    async with client(server) as c:
        for request in (
            {"type": "join", "room": "bad room!", "ref": "r1"},
            {"type": "join", "room": "a" * 65, "ref": "r2"},
            {"type": "join", "room": "", "ref": "r3"},
            {"type": "chat", "room": "bad room!", "text": "x", "ref": "r4"},
        ):
            await c.send(request)
            error = await c.recv_type("error", code="invalid_room", ref=request["ref"])
            assert error["detail"]
            await c.ping()
        await c.join("Ok_room-1.2:3" + uuid.uuid4().hex[:8])


async def test_error_not_joined_chat(server: Server) -> None:
    room = fresh()
    async with client(server) as c:
        await c.send({"type": "chat", "room": room, "text": "hello?", "ref": "nj"})
        error = await c.recv_type("error", code="not_joined", ref="nj", room=room)
        assert error["detail"]
        await c.ping()


async def test_error_text_too_long(limits_server: Server) -> None:
    room = fresh()
    async with room_client(limits_server, room) as c:
        await c.send({"type": "chat", "room": room, "text": "x" * 11, "ref": "long"})
        error = await c.recv_type("error", code="text_too_long", ref="long", room=room)
        assert error["detail"]
        await c.ping()
        ack, _ = await c.chat("é" * 10, ref="fits")  # characters, not bytes
        assert ack["offset"] == 1  # the long one was not stored
        await c.send("y" * 11)  # plain text on /ws/{room} obeys the same limit
        await c.recv_type("error", code="text_too_long", room=room)
        await c.ping()


async def test_error_room_path_chat_error_names_room(limits_server: Server) -> None:
    # On /ws/{room} a `chat` without `room` goes to the path's room; an error about
    # it concerns that room, so it carries it ("`ref` and `room` when they apply"),
    # as it does for the same chat sent as plain text or with `room` spelled out.
    room = fresh()
    async with room_client(limits_server, room) as c:
        await c.send("y" * 11)
        await c.recv_type("error", code="text_too_long", ref=None, room=room)
        await c.send({"type": "chat", "text": "x" * 11, "ref": "long"})
        await c.recv_type("error", code="text_too_long", ref="long", room=room)


# --- closing ---------------------------------------------------------------------------


async def test_message_over_max_bytes_closes_1009(limits_server: Server) -> None:
    async with client(limits_server) as c:
        await c.send({"type": "ping", "ref": "fits", "pad": "x" * 900})
        await c.recv_type("pong", ref="fits")
        await c.send({"type": "ping", "pad": "x" * 2000})
        assert await c.expect_close(1009) == []
    async with client(limits_server) as c:
        await c.send({"type": "ping", "pad": "é" * 600})  # 600 characters, 1200 bytes
        assert await c.expect_close(1009) == []


BAD_FRAMES: list[tuple[str | bytes, str]] = [
    ("{bad", "invalid_json"),
    ('{"type": "nope"}', "invalid_message"),
    (b"\x00", "unsupported_frame"),
]


async def send_bad(c: Client, count: int) -> list[str]:
    codes = []
    for i in range(count):
        frame, code = BAD_FRAMES[i % len(BAD_FRAMES)]
        await c.send(frame)
        codes.append(code)
    return codes


async def test_bad_frames_good_frame_resets_count(limits_server: Server) -> None:
    async with client(limits_server) as c:
        for round_ in range(3):
            for code in await send_bad(c, 49):
                error = await c.recv_type("error", code=code)
                assert error["detail"]
            await c.ping(f"alive-{round_}")


async def test_bad_frames_fifty_in_a_row_close_1008(limits_server: Server) -> None:
    async with client(limits_server) as c:
        codes = await send_bad(c, 50)
        frames = await c.expect_close(1008)
        assert [(f["type"], f["code"]) for f in frames] == [("error", code) for code in codes]
        assert all(f["detail"] for f in frames)


async def test_bad_frames_request_errors_do_not_count(limits_server: Server) -> None:
    async with client(limits_server) as c:
        for i in range(30):
            await c.send({"type": "chat", "room": "nowhere", "text": "x", "ref": f"n{i}"})
            await c.send({"type": "join", "room": "bad room!", "ref": f"i{i}"})
        for i in range(30):
            await c.recv_type("error", code="not_joined", ref=f"n{i}")
            await c.recv_type("error", code="invalid_room", ref=f"i{i}")
        await c.ping()


async def test_invalid_room_path_refused_1008(server: Server) -> None:
    for path in ("/ws/bad%20room!", "/ws/" + "a" * 65, "/ws/caf%C3%A9"):
        async with client(server, path, welcome=False) as c:
            frames = await c.expect_close(1008)
            assert len(frames) == 1, frames
            assert frames[0]["type"] == "error" and frames[0]["code"] == "invalid_room"
            assert frames[0]["detail"]


async def test_rate_limit_closes_4429_on_tenth_strike(rate_server: Server) -> None:
    # RATE_LIMIT=5: a burst of 10, then frames faster than 5/s are refused, and the
    # 10th refusal within a minute closes. Frames go out as fast as they are answered,
    # never more than the server still has to answer, so that none is sent into the close.
    async with client(rate_server) as c:
        sent = 0
        for _ in range(20):
            await c.send({"type": "ping", "ref": f"r{sent}"})
            sent += 1
        frames: list[Message] = []
        while sum(f["type"] == "error" for f in frames) < 10:
            if len(frames) == sent:
                assert sent < 40, frames
                await c.send({"type": "ping", "ref": f"r{sent}"})
                sent += 1
            frames.append(await c.recv())
        assert await c.expect_close(4429) == []
    assert [f["type"] for f in frames[:10]] == ["pong"] * 10  # the burst: twice RATE_LIMIT
    assert {f["type"] for f in frames} == {"pong", "error"}
    assert all(f["code"] == "rate_limited" and f["detail"] for f in frames if f["type"] == "error")
    pongs = [int(f["ref"][1:]) for f in frames if f["type"] == "pong"]
    assert pongs == sorted(pongs)


async def test_rate_limited_error_echoes_ref(rate_server: Server) -> None:
    async with client(rate_server) as c:
        for i in range(12):
            await c.send({"type": "ping", "ref": f"r{i}"})
        frames = await c.recv_many(12)
        assert [f["type"] for f in frames[:10]] == ["pong"] * 10
        for i, frame in enumerate(frames):
            if frame["type"] == "error":
                assert frame["code"] == "rate_limited"
            # "Replies and errors caused by a request echo its ref."
            assert frame["ref"] == f"r{i}", frame


async def test_max_connections_refuses_next_then_accepts(connections_server: Server) -> None:
    srv = connections_server
    await wait_counts(srv, connections=0)
    async with AsyncExitStack() as stack:
        held = [await stack.enter_async_context(client(srv)) for _ in range(3)]
        async with client(srv, welcome=False) as extra:
            frames = await extra.expect_close(4429)
            assert len(frames) == 1, frames
            assert frames[0]["type"] == "error" and frames[0]["code"] == "too_many_connections"
            assert frames[0]["detail"]
        await held[0].close()
        await wait_counts(srv, connections=2)
        async with client(srv) as again:
            await again.ping()
        for still in held[1:]:
            await still.ping()


async def test_max_connections_holds_under_concurrent_connects(connections_server: Server) -> None:
    srv = connections_server
    await wait_counts(srv, connections=0)
    async with AsyncExitStack() as stack:

        async def attempt() -> tuple[Client, Message]:
            c = await stack.enter_async_context(client(srv, welcome=False))
            return c, await c.recv()

        results = await asyncio.gather(*(attempt() for _ in range(8)))
        kinds = sorted(first["type"] for _, first in results)
        assert kinds == ["error"] * 5 + ["welcome"] * 3, [first for _, first in results]
        for c, first in results:
            if first["type"] == "error":
                assert first["code"] == "too_many_connections"
                assert await c.expect_close(4429) == []
        await wait_counts(srv, connections=3)


# --- HTTP ----------------------------------------------------------------------------------


async def test_metrics_count_connections_rooms_and_users(quiet_server: Server) -> None:
    srv = quiet_server
    await wait_counts(srv, connections=0, rooms=0, subscriptions=0, users=0, tasks=0)
    a, b = fresh(), fresh()
    async with client(srv, client="h1") as one, client(srv, client="h2") as two:
        await one.join(a)
        await one.join(b)
        await two.join(a)
        await one.recv_type("system", event="join", room=a, user=two.user)
        found = counts(srv)
        assert (found["connections"], found["rooms"], found["users"]) == (2, 2, 2), found
        assert found["subscriptions"] == 2, found
    status, health = await get(srv, "/healthz")
    assert (status, health) == (200, {"status": "ok"})  # public: it counts nothing


async def test_metrics_counts_zero_after_clients_disconnect(quiet_server: Server) -> None:
    srv = quiet_server
    room = fresh()
    await wait_counts(srv, connections=0)
    async with room_of(srv, room, 3) as members, client(srv) as other, client(srv) as dropped:
        await other.join(fresh())
        await dropped.join(room)
        await dropped.chat("then gone", room=room)
        found = counts(srv)
        assert (found["connections"], found["rooms"], found["subscriptions"]) == (5, 2, 2)
        dropped.ws.transport.abort()  # no close handshake: the TCP connection just ends
        await members[0].drain_until(
            lambda m: m["type"] == "system" and m["event"] == "leave" and m["online"] == 3
        )
    await wait_counts(srv, connections=0, rooms=0, subscriptions=0, users=0, tasks=0)


async def test_readyz_ready(server: Server) -> None:
    status, body = await get(server, "/readyz")
    assert status == 200, body


async def test_schema_json_is_valid(server: Server) -> None:
    status, schema = await get(server, "/schema.json")
    assert status == 200
    Draft202012Validator.check_schema(schema)
    defs: dict[str, Any] = schema["$defs"]
    assert {"ClientMessage", "ServerMessage"} <= set(defs)
    client_messages = Draft202012Validator({"$ref": "#/$defs/ClientMessage", "$defs": defs})
    assert client_messages.is_valid({"type": "join", "room": "a", "ref": "1"})
    assert client_messages.is_valid({"type": "ping"})
    assert not client_messages.is_valid({"type": "join"})
    assert not client_messages.is_valid({"type": "join", "room": "bad room!"})
    server_messages = Draft202012Validator({"$ref": "#/$defs/ServerMessage", "$defs": defs})
    assert server_messages.is_valid({"type": "pong", "ref": None})
    assert not server_messages.is_valid({"type": "pong", "ref": 5})
