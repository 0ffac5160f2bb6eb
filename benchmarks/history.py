"""The cost of history on the publish path, and the time to recover 1,000 missed messages.

For each history store, one real `roomcast serve` process: SENDERS clients
publish chats as fast as the server acknowledges them (a window of WINDOW
unacknowledged chats each) while one member of the room receives them all;
throughput is messages received per second, reported as a ratio to the
in-process memory store measured in the same run. Then a client joins with
`since` 1,000 messages behind and the time until its `joined` is measured.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from tests.brokers import fresh_database, start_postgres, start_redis
from tests.servers import Server, start_server

SENDERS = 4
WINDOW = 8
RECOVER = 1000


@dataclass
class Result:
    store: str
    messages: int
    seconds: float
    per_second: float
    ratio_to_memory: float
    recover_1000_ms: float


async def _joined(ws: ClientConnection) -> dict[str, Any]:
    while True:
        frame = json.loads(await ws.recv())
        if frame["type"] == "joined":
            return frame  # type: ignore[no-any-return]


async def _sender(server: Server, room: str, count: int) -> None:
    async with connect(f"{server.ws}/ws/{room}", max_size=None) as ws:
        await _joined(ws)
        unacked = 0
        sent = 0
        while sent < count or unacked:
            while sent < count and unacked < WINDOW:
                await ws.send(
                    json.dumps({"type": "chat", "text": f"m{sent}", "ref": uuid.uuid4().hex})
                )
                sent += 1
                unacked += 1
            frame = json.loads(await ws.recv())
            if frame["type"] == "ack":
                unacked -= 1


async def _throughput(server: Server, room: str, messages: int) -> float:
    async with connect(f"{server.ws}/ws/{room}", max_size=None) as receiver:
        await _joined(receiver)
        start = time.perf_counter()
        per = messages // SENDERS
        senders = [asyncio.create_task(_sender(server, room, per)) for _ in range(SENDERS)]
        received = 0
        while received < per * SENDERS:
            if json.loads(await receiver.recv())["type"] == "chat":
                received += 1
        elapsed = time.perf_counter() - start
        await asyncio.gather(*senders)
    return elapsed


async def _recover(server: Server, room: str) -> float:
    async with connect(f"{server.ws}/ws/{room}", max_size=None) as probe:
        top = await _joined(probe)
    since = f"{top['epoch']}:{top['offset'] - RECOVER}"
    start = time.perf_counter()
    async with connect(f"{server.ws}/ws/{room}?since={since}", max_size=None) as ws:
        replayed = 0
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "chat":
                replayed += 1
            elif frame["type"] == "joined":
                assert frame["recovered"] and replayed == RECOVER, (frame, replayed)
                break
    return time.perf_counter() - start


def run(quick: bool = False, stores: list[str] | None = None) -> list[Result]:
    messages = 2000 if quick else 8000
    rounds = 1 if quick else 3
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        urls: dict[str, Callable[[], str]] = {
            "memory": lambda: "memory://",
            "sqlite": lambda: f"sqlite:///{tmp / uuid.uuid4().hex}.db",
        }
        wanted = stores or ["memory", "sqlite", "redis", "postgres"]
        if "redis" in wanted:
            redis = start_redis()
            stack.callback(redis.stop)
            urls["redis"] = lambda: f"{redis.url}?prefix={uuid.uuid4().hex}"
        if "postgres" in wanted:
            postgres = start_postgres()
            stack.callback(postgres.stop)
            urls["postgres"] = lambda: asyncio.run(fresh_database(postgres.url))
        timings: dict[str, list[float]] = {s: [] for s in wanted}
        recoveries: dict[str, list[float]] = {s: [] for s in wanted}
        # Interleave the stores round by round, so a noisy moment hits all of them.
        for round_ in range(rounds):
            for store in wanted:
                server = start_server(
                    {
                        "HISTORY_URL": urls[store](),
                        "RATE_LIMIT": "100000",
                        "CONNECT_RATE": "0",
                        "HISTORY_SIZE": "2000",
                    }
                )
                try:
                    room = f"bench{round_}"
                    timings[store].append(asyncio.run(_throughput(server, room, messages)))
                    recoveries[store].append(asyncio.run(_recover(server, room)))
                finally:
                    server.terminate()
    base = statistics.median(timings["memory"]) if "memory" in timings else None
    results = []
    for store in wanted:
        seconds = statistics.median(timings[store])
        results.append(
            Result(
                store=store,
                messages=messages,
                seconds=round(seconds, 3),
                per_second=round(messages / seconds),
                ratio_to_memory=round(base / seconds, 2) if base else float("nan"),
                recover_1000_ms=round(statistics.median(recoveries[store]) * 1000, 1),
            )
        )
    return results


def table(results: list[Result]) -> str:
    lines = [
        "| history store | chats/s | ratio to memory | recover 1,000 missed (ms) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(f"| {r.store} | {r.per_second} | {r.ratio_to_memory} | {r.recover_1000_ms} |")
    return "\n".join(lines)


def as_json(results: list[Result]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
