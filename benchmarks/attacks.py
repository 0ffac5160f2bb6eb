"""`python -m benchmarks.attacks [--only memory,handshakes,churn] [--pythonpath DIR]`

The figures of issue 14's attacks on a real `roomcast serve` (loopback only):

- memory: 10 anonymous clients chat 4,000-character texts (astral characters,
  about 16 KB each) under RATE_LIMIT into 8 rooms each for `--seconds`, with
  HISTORY_MEMORY_MB=8 and HISTORY_TTL=10; the server's RSS before, at its peak,
  and a TTL after everyone left; and what a `history=1000` join then replays.
- handshakes: the server's fd limit lowered to 256 (`prlimit`), 1,000 sockets
  that send `GET /ws HTTP/1.1\\r\\n` and nothing more, while a real client
  reconnects and chats every half second: the server's open fds at their peak
  and how long until they are back, and how the real client fared.
- churn: 50 members in a room, then 200 connect/close cycles from another
  address without a frame: the frames each member got from them.

`--pythonpath DIR` runs the server from another copy of the package (a
directory holding `roomcast/`), e.g. the code before the fix.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from tests import attacks
from tests.servers import Server, start_server


@contextlib.asynccontextmanager
async def serving(env: dict[str, str], pythonpath: str | None) -> AsyncIterator[Server]:
    if pythonpath:
        env = {**env, "PYTHONPATH": pythonpath}
    server = await asyncio.to_thread(start_server, env)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.terminate)


async def memory(seconds: float, pythonpath: str | None) -> dict[str, Any]:
    ttl = 10
    env = {"HISTORY_MEMORY_MB": "8", "HISTORY_TTL": str(ttl), "CONNECT_RATE": "20"}
    async with serving(env, pythonpath) as server:
        pid = server.process.pid
        assert await attacks.replayed(server, "warm-up") == 0
        before = attacks.rss_mib(pid)
        async with attacks.Sampler(lambda: attacks.rss_mib(pid)).running() as rss:
            acked = await attacks.flood(server, seconds)
        left = time.monotonic()
        # Everyone left: the TTL, plus the sweep's period and a margin.
        await asyncio.sleep(ttl + ttl / 2 + 2)
        after = attacks.rss_mib(pid)
        replay = await attacks.replayed(server, "flood-0-0")
        return {
            "chats acked": acked,
            "RSS before (MiB)": round(before, 1),
            "RSS peak (MiB)": round(rss.peak, 1),
            f"RSS {time.monotonic() - left:.0f} s after (MiB)": round(after, 1),
            "history=1000 replays": replay,
        }


async def handshakes(pythonpath: str | None) -> dict[str, Any]:
    env = {"HANDSHAKE_TIMEOUT": "10", "CONNECT_RATE": "20"}
    async with serving(env, pythonpath) as server:
        pid = server.process.pid
        await attacks.limit_fds(pid, 256)
        base = attacks.open_fds(pid)
        stop = asyncio.Event()
        real = asyncio.create_task(attacks.chatter(server, "lobby", stop))
        async with attacks.Sampler(lambda: attacks.open_fds(pid)).running() as fds:
            started = time.monotonic()
            held = await asyncio.to_thread(attacks.half_handshakes, server.port, 1000)
            opened = time.monotonic()
            back = None
            while time.monotonic() - opened < 40:
                if attacks.open_fds(pid) <= base + 2:
                    back = time.monotonic() - opened
                    break
                await asyncio.sleep(0.2)  # polling the fd count, bounded above
        open_after = attacks.still_open(held)
        stop.set()
        outcomes = await real
        for sock in held:
            sock.close()
        return {
            "fds before": base,
            "fds peak": int(fds.peak),
            "sockets the attacker got": len(held),
            "seconds to open them": round(opened - started, 1),
            "fds back to normal after (s)": "not within 40" if back is None else round(back, 1),
            "attacker's sockets still open then": open_after,
            "real client's attempts ok": f"{outcomes.count('ok')}/{len(outcomes)}",
        }


async def churn(pythonpath: str | None) -> dict[str, Any]:
    async with serving({"CONNECT_RATE": "20"}, pythonpath) as server:
        sockets = []
        for index in range(50):  # from two addresses: each within CONNECT_RATE's burst
            source = f"127.0.0.{1 + index % 2 * 2}"
            sockets.append(await attacks.ws_connect(server, "/ws/churn", source))
        members = attacks.Counting(sockets)
        try:
            before = await members.quiet()
            started = time.monotonic()
            answers = await attacks.churn(server, "churn", 200)
            elapsed = time.monotonic() - started
            after = await members.quiet()
        finally:
            await members.close()
        got = [a - b for a, b in zip(after, before, strict=True)]
        return {
            "cycles": 200,
            "seconds": round(elapsed, 2),
            "answers": answers,
            "frames per member (min/max)": f"{min(got)}/{max(got)}",
        }


async def run(only: list[str], seconds: float, pythonpath: str | None) -> None:
    for name in only:
        if name == "memory":
            result = await memory(seconds, pythonpath)
        elif name == "handshakes":
            result = await handshakes(pythonpath)
        else:
            result = await churn(pythonpath)
        print(f"{name}:")
        for key, value in result.items():
            print(f"  {key}: {value}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attacks", description=__doc__)
    parser.add_argument("--only", default="memory,handshakes,churn")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the flood")
    parser.add_argument("--pythonpath", default=None, help="run the server from this copy")
    args = parser.parse_args()
    asyncio.run(run(args.only.split(","), args.seconds, args.pythonpath))
    return 0


if __name__ == "__main__":
    sys.exit(main())
