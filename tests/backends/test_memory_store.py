"""`MemoryStore` stays bounded: HISTORY_TTL by a sweep, HISTORY_MEMORY_MB by eviction.

What it evicts is honestly gone: `since` from before it is incomplete, and a
room it forgot altogether comes back with a new epoch.
"""

from __future__ import annotations

import asyncio

from roomcast.backends.history.base import Build, recovered
from roomcast.backends.history.memory import ROOM_OVERHEAD, MemoryStore
from roomcast.protocol.codec import encode
from roomcast.protocol.envelopes import Chat, User, now

from ..waiting import eventually, within

USER = User("u1", "Ada")
TEXT = "x" * 4000


def chat(room: str, text: str = TEXT) -> Build:
    return lambda epoch, offset: encode(Chat(room, epoch, offset, USER, text, now()))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_memory_stays_within_the_budget_across_rooms() -> None:
    budget = 200_000
    store = MemoryStore(1000, 3600, budget)
    for i in range(500):  # about 2 MB of chats over 50 rooms
        await store.append(f"room-{i % 50}", chat(f"room-{i % 50}"))
        assert store.held <= budget
    assert store.held > budget * 0.9  # the budget is used, not wasted


async def test_the_least_recently_written_rooms_lose_their_oldest_messages_first() -> None:
    store = MemoryStore(1000, 3600, 70_000)  # about 15 chats
    epochs = {room: (await store.append(room, chat(room))).epoch for room in ("old", "new")}
    for _ in range(9):
        await store.append("old", chat("old"))
    for _ in range(9):
        await store.append("new", chat("new"))  # past the budget: "old" pays
    old, new = await store.since("old", 0), await store.since("new", 0)
    assert (new.top, len(new.entries), new.complete) == (10, 10, True)
    assert old.top == 10 and not old.complete and len(old.entries) < 10
    # What is left of "old" is its newest messages, and a client that had them all recovers.
    assert recovered(epochs["old"], 10, await store.since("old", 10))
    first_kept = 10 - len(old.entries)
    assert not recovered(epochs["old"], first_kept - 1, await store.since("old", first_kept - 1))
    assert recovered(epochs["old"], first_kept, await store.since("old", first_kept))


async def test_a_room_that_lost_every_message_keeps_its_epoch_and_offsets() -> None:
    store = MemoryStore(1000, 3600, 60_000)
    first = await store.append("quiet", chat("quiet"))
    for i in range(20):  # other rooms written later push all of "quiet" out
        await store.append(f"r{i}", chat(f"r{i}"))
    page = await store.since("quiet", 0)
    assert (page.epoch, page.top, page.entries, page.complete) == (first.epoch, 1, [], False)
    assert recovered(first.epoch, 1, await store.since("quiet", 1))  # it had everything
    again = await store.append("quiet", chat("quiet"))
    assert (again.epoch, again.offset) == (first.epoch, 2)


async def test_too_many_rooms_without_messages_are_forgotten_oldest_first() -> None:
    store = MemoryStore(1000, 3600, 50 * ROOM_OVERHEAD)
    first = await store.since("first", 0)  # joined, never written: only its record
    for i in range(100):
        await store.since(f"empty-{i}", 0)
        assert store.held <= store.memory_bytes
    page = await store.since("first", 0)
    assert page.epoch != first.epoch  # forgotten: whoever joined it learns it is new
    assert not recovered(first.epoch, 1, page)


async def test_the_sweep_drops_expired_messages_and_then_the_room() -> None:
    clock = Clock()
    store = MemoryStore(1000, 60, clock=clock)
    epoch = (await store.append("r", chat("r"), "ref")).epoch
    baseline = ROOM_OVERHEAD + 100  # one room, no messages
    assert store.held > 4000
    clock.now += 30
    await store.last("r", 0)  # a join reads the room: it is still in use

    clock.now += 31
    store.sweep()  # the message is a TTL old: the sweep alone lets go of it
    assert store.held < baseline
    clock.now += 29
    store.sweep()
    page = await store.since("r", 0)
    assert (page.epoch, page.top, page.entries, page.complete) == (epoch, 1, [], False)

    clock.now += 61  # a TTL without a read or a write: the room itself is forgotten
    store.sweep()
    assert store.held == 0
    fresh = await store.since("r", 1)
    assert fresh.epoch != epoch and fresh.top == 0 and not recovered(epoch, 1, fresh)


async def test_a_room_read_within_the_ttl_keeps_its_epoch() -> None:
    clock = Clock()
    store = MemoryStore(1000, 60, clock=clock)
    joined = await store.since("quiet", 0)  # a client joins the empty room
    for _ in range(3):
        clock.now += 40
        store.sweep()
        assert (await store.last("quiet", 0)).epoch == joined.epoch  # read: still there
    first = await store.append("quiet", chat("quiet"))
    assert (first.epoch, first.offset) == (joined.epoch, 1)


async def test_the_sweep_runs_while_connected() -> None:
    store = MemoryStore(1000, 1)
    await within(store.connect())
    try:
        await store.append("r", chat("r"))
        held = store.held
        # Polled: the sweep runs every half TTL; nothing reads the room meanwhile.
        await eventually(lambda: asyncio.sleep(0, store.held), lambda h: h < held - 4000)
    finally:
        await within(store.disconnect())
    assert store._sweeper is None


async def test_deduplication_keys_count_and_go_with_their_message() -> None:
    store = MemoryStore(1000, 3600, 30_000)
    first = await store.append("r", chat("r"), "key-1")
    assert (await store.append("r", chat("r"), "key-1")).duplicate
    for _ in range(10):
        await store.append("r", chat("r"))
    again = await store.append("r", chat("r"), "key-1")  # evicted with its message
    assert not again.duplicate and again.offset > first.offset
