"""The outbox rules of one connection, against a fake `send`: no server, no sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.types import Message

from roomcast.engine.connection import Connection
from roomcast.engine.wire import Wire
from roomcast.protocol.envelopes import User


class FakeSend:
    """An ASGI `send` that records what it is given; while `paused`, each send waits
    (as uvicorn's does while the client does not read)."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.resume = asyncio.Event()
        self.resume.set()
        self.waiting = 0
        self.fail = False

    def pause(self) -> None:
        self.resume.clear()

    async def __call__(self, message: Message) -> None:
        if self.fail:
            raise OSError("the client went away")
        if not self.resume.is_set():
            self.waiting += 1
            await self.resume.wait()
            self.waiting -= 1
        self.messages.append(message)

    @property
    def texts(self) -> list[str]:
        return [m["text"] for m in self.messages if m["type"] == "websocket.send"]

    @property
    def closes(self) -> list[int]:
        return [m["code"] for m in self.messages if m["type"] == "websocket.close"]


class Dropped:
    def __init__(self) -> None:
        self.overflows: list[Connection] = []
        self.aborted = 0

    def overflow(self, conn: Connection) -> None:
        self.overflows.append(conn)

    def abort(self) -> None:
        self.aborted += 1


def connection(send: FakeSend, dropped: Dropped, limit: int = 4) -> Connection:
    conn = Connection(
        "c1",
        User("u", "U"),
        Wire(send, dropped.abort),
        limit=limit,
        rate=100,
        on_overflow=dropped.overflow,
    )
    conn.start()
    return conn


async def next_turns(n: int = 2) -> None:
    for _ in range(n):
        await asyncio.sleep(0)  # let the event loop run the scheduled flush


async def until(predicate: Any, within: float = 2.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(0.001)


async def test_frames_of_one_turn_leave_at_the_next_in_order_without_a_task() -> None:
    send, dropped = FakeSend(), Dropped()
    conn = connection(send, dropped)
    for n in range(10):  # more than the outbox holds: written at once, not queued
        assert conn.send(f"f{n}")
    assert send.texts == []  # nothing written within the turn that pushed
    await next_turns()
    assert send.texts == [f"f{n}" for n in range(10)]
    assert not dropped.overflows
    assert conn._sender is None  # written inline: no task for an idle connection


async def test_a_waiting_send_queues_what_follows_up_to_the_limit_then_overflows() -> None:
    send, dropped = FakeSend(), Dropped()
    conn = connection(send, dropped, limit=4)
    send.pause()
    conn.send("first")
    await next_turns()
    assert send.waiting == 1 and conn.sending  # the sender task finishes it
    for n in range(4):
        assert conn.send(f"q{n}")
    assert not conn.send("one too many")
    assert dropped.overflows == [conn] and conn.closing
    assert not conn.send("after the overflow")
    assert dropped.overflows == [conn]  # reported once


async def test_a_client_that_reads_again_gets_everything_in_order() -> None:
    send, dropped = FakeSend(), Dropped()
    conn = connection(send, dropped, limit=8)
    send.pause()
    conn.send("a")
    await next_turns()
    for text in ("b", "c"):
        conn.send(text)
    send.resume.set()
    await until(lambda: len(send.texts) == 3)
    assert send.texts == ["a", "b", "c"]
    await until(lambda: conn._sender is None)
    conn.send("d")  # inline again once drained
    await next_turns()
    assert send.texts[-1] == "d" and conn._sender is None


async def test_a_replay_does_not_count_towards_the_outbox() -> None:
    send, dropped = FakeSend(), Dropped()
    conn = connection(send, dropped, limit=2)
    conn.push_replay([f"r{n}" for n in range(50)])
    conn.send("joined")
    await until(lambda: len(send.texts) == 51)
    assert send.texts == [*(f"r{n}" for n in range(50)), "joined"]
    assert not dropped.overflows


async def test_close_after_queued_sends_what_is_queued_then_closes() -> None:
    send, dropped = FakeSend(), Dropped()
    conn = connection(send, dropped)
    conn.send("error: why")
    conn.close_after_queued(4401)
    assert not conn.send("too late")
    await until(lambda: send.closes == [4401])
    assert send.texts == ["error: why"]


async def test_drop_aborts_a_client_that_never_completes_the_close() -> None:
    send, dropped = FakeSend(), Dropped()
    conn = connection(send, dropped)
    send.pause()  # the close frame can never be written
    await conn.drop(4408, grace=0.05)
    assert dropped.aborted == 1


async def test_drop_of_a_client_that_answers_does_not_abort() -> None:
    send, dropped = FakeSend(), Dropped()
    conn = connection(send, dropped)
    dropping = asyncio.create_task(conn.drop(4408, grace=2.0))
    await until(lambda: send.closes == [4408])
    conn.stop()  # the server saw the close complete: the socket is gone
    await asyncio.wait_for(dropping, 2)
    assert dropped.aborted == 0


async def test_a_send_that_fails_ends_the_connection_quietly() -> None:
    send, dropped = FakeSend(), Dropped()
    conn = connection(send, dropped)
    send.fail = True
    conn.send("lost")
    await next_turns()
    assert conn.closing and not conn.sending
    assert not conn.send("more")


@pytest.mark.parametrize("limit", [1, 3])
async def test_frames_queued_before_start_are_written_at_start(limit: int) -> None:
    send, dropped = FakeSend(), Dropped()
    conn = Connection(
        "c2", User("u", "U"), Wire(send), limit=limit, rate=1, on_overflow=dropped.overflow
    )
    conn.send("welcome")
    assert send.texts == []
    conn.start()
    await next_turns()
    assert send.texts == ["welcome"]
