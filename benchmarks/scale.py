"""Many connections on one worker: a 10,000-member room, and 100,000 idle connections.

The subscribers are spread over several load-generator processes
(`crowd.py`), and for the idle connections over several loopback source
addresses (127.0.0.2, 127.0.0.3, …: one address has only ~28,000 ephemeral
ports). The open-file limit is raised for the server (before it starts) and
for every load-generator process, up to the hard limit; beyond it only a
process with CAP_SYS_RESOURCE may go. Where the hard limit is lower than
the count asked for, the largest count it allows is measured, and the
table says so.

The room (2,000 members in a quick run): the members join, then a publisher
sends chats at 10 per second; reported are publish-to-receive latency over every delivery (in
10 µs buckets), what was lost, and the server's CPU per delivery. Idle: the
connections join one room and stay quiet; reported are the connection rate
(all processes together, from the first connect to the last handshake),
the server's memory per connection after they joined (VmRSS, less before,
over the connections), and two chats to all of them at the end, so that
every connection is shown to be alive.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from . import procs
from .harness import measure, say
from .servers import BASELINES, ROOMCAST

ROOM_RATE = 10
PORTS_PER_ADDRESS = 25_000  # of the 28,232 ephemeral ports Linux has by default
SERVER_FILES = 100  # open files a server needs besides its connections


@dataclass
class Room:
    name: str
    members: int
    connect_s: float
    connects_per_s: int
    idle_kib: float
    messages: int
    deliveries: int
    lost: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    cpu_us: float
    processes: int
    server_percent: int  # near 100: the latency is the server's backlog
    busiest_client_percent: int  # near 100: the latency is the load generator's


@dataclass
class Idle:
    name: str
    asked: int
    connections: int
    limit_note: str
    connect_s: float
    connects_per_s: int
    idle_kib: float
    peak_mib: float
    cpu_us: float
    lost: int
    processes: int
    addresses: int


@dataclass
class Results:
    room: Room
    idle: list[Idle]


def run(quick: bool = False) -> Results:
    members, seconds = (2_000, 3) if quick else (10_000, 30)
    asked = 4_000 if quick else 100_000
    room = _room(members, seconds, 1 if quick else 2)
    idle = [_idle(ROOMCAST, asked)]
    if not quick:
        idle.append(_idle(BASELINES[0], asked))
    return Results(room, idle)


def _room(members: int, seconds: int, helpers: int) -> Room:
    say(f"room of {members:,} at {ROOM_RATE}/s")
    report = measure(
        ROOMCAST,
        {
            "subscribers": members,
            "settle": 1.0,
            "helpers": helpers,
            "phases": [{"mode": "paced", "messages": seconds * ROOM_RATE, "rate": ROOM_RATE}],
        },
        {"MAX_CONNECTIONS": str(members + 100)},
        nofile=members + SERVER_FILES,
        timeout=300 + members / 50,
    )
    phase = report["phases"][0]
    return Room(
        name="roomcast",
        members=members,
        connect_s=report["connect_s"],
        connects_per_s=report["connects_per_s"],
        idle_kib=report["idle_kib_per_connection"],
        messages=phase["sent"],
        deliveries=phase["deliveries"],
        lost=phase["lost"],
        p50_ms=phase["p50_ms"],
        p99_ms=phase["p99_ms"],
        max_ms=phase["max_ms"],
        cpu_us=phase["cpu_us_per_delivery"],
        processes=helpers + 1,
        server_percent=round(100 * phase["cpu_s"] / phase["seconds"]),
        busiest_client_percent=phase["busiest_client_percent"],
    )


def _idle(spec: Any, asked: int) -> Idle:
    ceiling = procs.nofile_ceiling(asked + SERVER_FILES)
    count = min(asked, ceiling - SERVER_FILES)
    note = ""
    if count < asked:
        note = (
            f"the hard limit of open files here is {ceiling:,} and this process may not raise "
            "it (no CAP_SYS_RESOURCE)"
        )
    per_process = ceiling - SERVER_FILES
    processes = max(2, -(-count // per_process))
    addresses = max(2, -(-count // PORTS_PER_ADDRESS))
    say(f"idle: {spec.name}, {count:,} connections")
    report = measure(
        spec,
        {
            "subscribers": count,
            "settle": 2.0,
            "helpers": processes - 1,
            "bind": [f"127.0.0.{2 + i}" for i in range(addresses)],
            "phases": [{"mode": "paced", "messages": 2, "rate": 2}],
        },
        {"MAX_CONNECTIONS": str(count + 100)},
        nofile=count + SERVER_FILES,
        timeout=300 + count / 50,
    )
    phase = report["phases"][0]
    return Idle(
        name=spec.name,
        asked=asked,
        connections=count,
        limit_note=note,
        connect_s=report["connect_s"],
        connects_per_s=report["connects_per_s"],
        idle_kib=report["idle_kib_per_connection"],
        peak_mib=round(report["peak_rss"] / 2**20, 1),
        cpu_us=phase["cpu_us_per_delivery"],
        lost=phase["lost"],
        processes=processes,
        addresses=addresses,
    )


def table(r: Results) -> str:
    room = r.room
    out = [
        f"### A {room.members:,}-member room at {ROOM_RATE} chats/s\n",
        f"{room.processes} load-generator processes; {room.messages} chats, each to every "
        "member. CPU time over the window, of the server and of the busiest load-generator "
        "process: whichever is near 100% sets the latency with its backlog.\n",
        "| server | members | connect + join s | connects/s | idle KiB/conn | deliveries "
        "| lost | p50 ms | p99 ms | max ms | CPU µs/delivery | server CPU % "
        "| busiest load generator % |",
        "|" + " --- |" + " ---: |" * 12,
        f"| {room.name} | {room.members} | {room.connect_s} | {room.connects_per_s} "
        f"| {room.idle_kib} | {room.deliveries} | {room.lost} | {room.p50_ms} | {room.p99_ms} "
        f"| {room.max_ms} | {room.cpu_us} | {room.server_percent} "
        f"| {room.busiest_client_percent} |",
    ]
    first = r.idle[0]
    out += [f"\n### {first.asked:,} idle connections on one worker\n"]
    if first.limit_note:
        out.append(
            f"**Measured with {first.connections:,} connections, not {first.asked:,}:** "
            f"{first.limit_note}.\n"
        )
    out += [
        "| server | connections | load generators | source addresses | connect + join s "
        "| connects/s | idle KiB/conn | peak MiB | CPU µs/delivery | lost |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    out += [
        f"| {i.name} | {i.connections} | {i.processes} | {i.addresses} | {i.connect_s} "
        f"| {i.connects_per_s} | {i.idle_kib} | {i.peak_mib} | {i.cpu_us} | {i.lost} |"
        for i in r.idle
    ]
    return "\n".join(out)


def as_json(r: Results) -> dict[str, Any]:
    return asdict(r)
