"""The cluster's figures for the admin: stats and rooms across every worker.

Every worker that shares the broker answers a `Query` on the control channel
with its own figures (its connections, the names of its rooms and users, its
per-second activity), and the asking worker merges them: counts are summed,
rooms and users counted once however many workers hold them, rates summed.

For the room list each worker says how many distinct users it has in each
room. A room whose users are all on one worker has that many online; only a
room with users on several workers (one user may be on two) is looked up in
the presence store, so a list costs few store reads however many rooms
there are.
While the broker is away no other worker can answer: the figures are this
worker's, and `broker` says `reconnecting`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import Final, Literal, TypeVar

import msgspec
from msgspec import UNSET, Struct, UnsetType

from ..backends.history.base import HistoryStore
from ..backends.presence.base import PresenceStore
from .control import Control, Query
from .rates import RATE_SECONDS, SERIES_SECONDS, Activity
from .sequencer import Room
from .transport import Transport

log = logging.getLogger("roomcast.hub")

PROBE_TIMEOUT: Final = 2.0  # seconds the history store may take to answer its probe
LOOKUPS: Final = 16  # presence and history reads in flight for one room list

T = TypeVar("T")
R = TypeVar("R")


class StatsQuery(Struct):
    series: bool = False


class RoomsQuery(Struct):
    prefix: str = ""


class WorkerStats(Struct):
    """One worker's answer to `stats`."""

    connections: int
    rooms: list[str]
    users: list[str]
    messages_in_per_s: float
    deliveries_per_s: float
    slow_consumers_total: int
    end: int = 0  # the series cover the seconds before this one (Unix time)
    connection_series: list[int] = []
    delivery_series: list[int] = []


class WorkerRooms(Struct):
    rooms: dict[str, int]  # room -> this worker's distinct users in it


class Series(Struct):
    """Per second over the last 5 minutes, oldest first, ending before `end` (Unix time)."""

    end: int
    connections: list[int]
    deliveries: list[int]


class Stats(Struct):
    workers: int
    connections: int
    rooms: int
    users: int
    messages_in_per_s: float
    deliveries_per_s: float
    slow_consumers_total: int
    broker: Literal["connected", "reconnecting"]
    history: Literal["connected", "unavailable"]
    series: Series | UnsetType = UNSET


class RoomInfo(Struct):
    room: str
    online: int
    epoch: str
    offset: int


_stats_decoder = msgspec.json.Decoder(WorkerStats)
_rooms_decoder = msgspec.json.Decoder(WorkerRooms)
_encoder = msgspec.json.Encoder()


class Cluster:
    def __init__(
        self,
        control: Control,
        transport: Transport,
        store: HistoryStore,
        presence: PresenceStore,
        activity: Activity,
        rooms: Mapping[str, Room],
        users: Collection[str],
    ) -> None:
        self.control = control
        self.transport = transport
        self.store = store
        self.presence = presence
        self.activity = activity
        self.rooms = rooms
        self.users = users
        control.responders["stats"] = self._answer_stats
        control.responders["rooms"] = self._answer_rooms

    # --- what this worker answers ----------------------------------------

    def local_stats(self, series: bool = False) -> WorkerStats:
        activity = self.activity
        stats = WorkerStats(
            connections=activity.connections.value,
            rooms=list(self.rooms),
            users=list(self.users),
            messages_in_per_s=activity.messages_in.per_second(RATE_SECONDS),
            deliveries_per_s=activity.deliveries.per_second(RATE_SECONDS),
            slow_consumers_total=activity.slow_consumers,
        )
        if series:
            stats.end, stats.delivery_series = activity.deliveries.last(SERIES_SECONDS)
            stats.connection_series = activity.connections.last(SERIES_SECONDS)[1]
        return stats

    def _answer_stats(self, params: msgspec.Raw) -> bytes:
        query = msgspec.json.decode(params, type=StatsQuery | None) or StatsQuery()
        return _encoder.encode(self.local_stats(query.series))

    def _answer_rooms(self, params: msgspec.Raw) -> bytes:
        query = msgspec.json.decode(params, type=RoomsQuery | None) or RoomsQuery()
        return _encoder.encode(self.local_rooms(query.prefix))

    def local_rooms(self, prefix: str) -> WorkerRooms:
        return WorkerRooms(
            {
                name: len({conn.user.id for conn in room.members})
                for name, room in self.rooms.items()
                if name.startswith(prefix)
            }
        )

    # --- what the asking worker merges -------------------------------------

    async def _ask(self, what: str, params: Struct, decoder: msgspec.json.Decoder[T]) -> list[T]:
        """Every worker's answer; [] while the broker is away (no other worker can answer)."""
        if not self.transport.ready:
            return []
        try:
            bodies = await self.control.ask(Query(what, msgspec.Raw(_encoder.encode(params))))
        except Exception as exc:  # the broker or presence store failed under us
            log.warning("%s query not answered: %r", what, exc)
            return []
        answers = []
        for body in bodies:
            try:
                answers.append(decoder.decode(body))
            except msgspec.DecodeError as exc:  # a worker of another version
                log.warning("%s answer not understood: %r", what, exc)
        return answers

    async def stats(self, series: bool = False) -> Stats:
        probe = asyncio.create_task(self._history_state())
        answers = await self._ask("stats", StatsQuery(series), _stats_decoder)
        broker: Literal["connected", "reconnecting"] = "connected"
        if not answers:
            answers, broker = [self.local_stats(series)], "reconnecting"
        merged = Stats(
            workers=len(answers),
            connections=sum(a.connections for a in answers),
            rooms=len({room for a in answers for room in a.rooms}),
            users=len({user for a in answers for user in a.users}),
            messages_in_per_s=round(sum(a.messages_in_per_s for a in answers), 2),
            deliveries_per_s=round(sum(a.deliveries_per_s for a in answers), 2),
            slow_consumers_total=sum(a.slow_consumers_total for a in answers),
            broker=broker,
            history=await probe,
        )
        if series:
            merged.series = _series(answers)
        return merged

    async def _online(self, room: str) -> int:
        return (await self.presence.snapshot(room, 0))[0]

    async def _history_state(self) -> Literal["connected", "unavailable"]:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await self.store.ping()
        except Exception:
            return "unavailable"
        return "connected"

    async def room_list(self, prefix: str, limit: int) -> list[RoomInfo]:
        """The rooms with members on any worker, most users online first."""
        answers = await self._ask("rooms", RoomsQuery(prefix), _rooms_decoder)
        if not answers:
            answers = [self.local_rooms(prefix)]
        counts: dict[str, list[int]] = {}
        for answer in answers:
            for room, users in answer.rooms.items():
                counts.setdefault(room, []).append(users)

        # Every user on one worker: its count. Else the presence store knows who is on both.
        online = {room: max(found) for room, found in counts.items() if max(found) == sum(found)}
        shared = [room for room in counts if room not in online]
        online.update(zip(shared, await _each(self._online, shared), strict=True))
        ranked = sorted(online.items(), key=lambda rc: (-rc[1], rc[0]))[:limit]
        pages = await _each(lambda room: self.store.last(room, 0), [room for room, _ in ranked])
        return [
            RoomInfo(room, count, page.epoch, page.top)
            for (room, count), page in zip(ranked, pages, strict=True)
        ]


async def _each(fn: Callable[[T], Awaitable[R]], items: Iterable[T]) -> list[R]:
    """`fn` of every item, at most LOOKUPS at a time, in the items' order."""
    gate = asyncio.Semaphore(LOOKUPS)

    async def one(item: T) -> R:
        async with gate:
            return await fn(item)

    return list(await asyncio.gather(*(one(item) for item in items)))


def _series(answers: list[WorkerStats]) -> Series:
    """The workers' series added up second by second, on the latest worker's clock."""
    end = max(a.end for a in answers)
    connections = [0] * SERIES_SECONDS
    deliveries = [0] * SERIES_SECONDS
    for a in answers:
        shift = end - a.end  # this worker's series ended `shift` seconds earlier
        for i in range(SERIES_SECONDS):
            j = i + shift
            if 0 <= j < len(a.delivery_series):
                deliveries[i] += a.delivery_series[j]
                connections[i] += a.connection_series[j]
            elif a.connection_series:  # past its end: the latest value it had
                connections[i] += a.connection_series[-1]
    return Series(end, connections, deliveries)
