"""Cross-worker delivery: the same load on one server, then on two behind one Redis.

RECEIVERS members of one room (on two servers: half on each) and one
publisher on the first server sending MESSAGES chats at RATE per second,
each carrying its send time. Reported: deliveries per second over the whole
run, publish-to-receive latency p50/p99/max, messages lost; the two-server
figures as ratios to the one-server run measured just before them.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from tests.brokers import start_redis
from tests.servers import Server, start_server

RECEIVERS = 100
RATE = 100


@dataclass
class Result:
    setup: str
    deliveries_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    lost: int
    rate_ratio: float = 1.0
    p99_ratio: float = 1.0


async def _member(server: Server, room: str) -> ClientConnection:
    ws = await connect(f"{server.ws}/ws/{room}", max_size=None)
    while json.loads(await ws.recv())["type"] != "joined":
        pass
    return ws


async def _receive(ws: ClientConnection, count: int, latencies: list[float]) -> int:
    got = 0
    try:
        async with asyncio.timeout(30 + count / RATE):
            while got < count:
                frame = json.loads(await ws.recv())
                if frame["type"] == "chat":
                    latencies.append(time.time() - float(frame["text"]))
                    got += 1
    except TimeoutError:
        pass
    return got


async def _run(servers: list[Server], messages: int) -> tuple[float, list[float], int]:
    room = f"fan{uuid.uuid4().hex[:8]}"
    members = [await _member(servers[i % len(servers)], room) for i in range(RECEIVERS)]
    publisher = await _member(servers[0], room)
    latencies: list[float] = []
    readers = [asyncio.create_task(_receive(m, messages, latencies)) for m in members]
    start = time.perf_counter()
    for n in range(messages):
        await publisher.send(json.dumps({"type": "chat", "text": repr(time.time())}))
        await asyncio.sleep(max(0.0, start + (n + 1) / RATE - time.perf_counter()))  # pacing
    received = sum(await asyncio.gather(*readers))
    elapsed = time.perf_counter() - start
    # Dropped, not closed: a close handshake with roomcast takes about 3 s (a bug to chase).
    for ws in (*members, publisher):
        ws.transport.abort()
    return elapsed, latencies, RECEIVERS * messages - received


def _result(setup: str, elapsed: float, latencies: list[float], lost: int) -> Result:
    ordered = sorted(latencies) or [float("nan")]
    return Result(
        setup=setup,
        deliveries_per_s=round(len(latencies) / elapsed),
        p50_ms=round(statistics.median(ordered) * 1000, 2),
        p99_ms=round(ordered[int(len(ordered) * 0.99) - 1] * 1000, 2),
        max_ms=round(ordered[-1] * 1000, 2),
        lost=lost,
    )


def run(quick: bool = False) -> list[Result]:
    messages = 100 if quick else 400
    redis = start_redis()
    try:
        env = {"BROADCAST_URL": redis.url, "RATE_LIMIT": "100000", "CONNECT_RATE": "0"}
        results = []
        for count in (1, 2):
            servers = [start_server(env) for _ in range(count)]
            try:
                elapsed, latencies, lost = asyncio.run(_run(servers, messages))
            finally:
                for server in servers:
                    server.terminate()
            results.append(_result(f"{count} server(s), Redis", elapsed, latencies, lost))
        one, two = results
        two.rate_ratio = round(two.deliveries_per_s / one.deliveries_per_s, 2)
        two.p99_ratio = round(two.p99_ms / one.p99_ms, 2)
        return results
    finally:
        redis.stop()


def table(results: list[Result]) -> str:
    lines = [
        "| setup | deliveries/s | p50 ms | p99 ms | max ms | lost | rate vs 1 | p99 vs 1 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.setup} | {r.deliveries_per_s} | {r.p50_ms} | {r.p99_ms} | {r.max_ms} "
            f"| {r.lost} | {r.rate_ratio} | {r.p99_ratio} |"
        )
    return "\n".join(lines)


def as_json(results: list[Result]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
