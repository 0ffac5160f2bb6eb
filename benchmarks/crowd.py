"""Subscribers in helper processes, for rooms bigger than one client process handles well.

The load generator (`loadgen.py`) starts each helper as its child, in its
own process group, with `python -m benchmarks.crowd '<json>'`: the helper
connects its share of the subscribers, then speaks JSON lines. It writes
`{"connected": …}` once, then `{"received", "synced", "closed"}` whenever
they change (every 50 ms at most); it answers `{"phase": P}` (count frames of
phase P from now on) with `{"ack": P}`, and `{"report": true}` with the phase's CPU time,
deliveries, latency buckets and bytes on the wire; `{"quit": true}` ends it.
Only paced phases run over helpers: a burst needs the publisher to see
every delivery at once.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from typing import Any

from .clients import Run, Subscriber, connect_all
from .procs import die_with_parent, raise_nofile

PROGRESS_EVERY = 0.05


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def helper(plan: dict[str, Any]) -> None:
    numbers = range(plan["first"], plan["first"] + plan["count"])
    raise_nofile(plan["count"] + 200)
    run = Run(plan["count"])
    started = time.monotonic()
    subs = await connect_all(
        run, plan["url"], numbers, deflate=plan.get("deflate", False), bind=plan.get("bind")
    )
    _say(
        {
            "connected": len(subs),
            "started": started,
            "done": time.monotonic(),
            "deflated": sum(s.deflate for s in subs),
        }
    )
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    progress = asyncio.create_task(_progress(run, subs))
    bytes0 = 0
    cpu0 = time.process_time()
    try:
        while line := await reader.readline():
            command = json.loads(line)
            if "phase" in command:
                run.reset(command["phase"].encode())
                bytes0 = sum(s.bytes_received() for s in subs)
                cpu0 = time.process_time()
                _say({"ack": command["phase"]})
            elif "report" in command:
                wire = sum(s.bytes_received() for s in subs) - bytes0
                _say({"report": _report(run, wire, time.process_time() - cpu0)})
            elif "quit" in command:
                break
    finally:
        progress.cancel()
        for sub in subs:
            if sub.transport is not None and not sub.transport.is_disconnected:
                sub.transport.disconnect()
        await asyncio.sleep(0.2)


def _report(run: Run, wire_bytes: int, cpu_s: float) -> dict[str, Any]:
    return {
        "cpu_s": cpu_s,
        "received": run.received,
        "frame_bytes": run.frame_bytes,
        "wire_bytes": wire_bytes,
        "latencies": {str(k): v for k, v in run.latencies.items()},
    }


async def _progress(run: Run, subs: list[Subscriber]) -> None:
    last: dict[str, int] = {}
    while True:
        now = {
            "received": run.received,
            "synced": len(run.synced),
            "closed": sum(1 for s in subs if s.close_code),
        }
        if now != last:
            _say(now)
            last = now
        await asyncio.sleep(PROGRESS_EVERY)


class Crowd:
    """The load generator's handle on one helper process."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.received = 0
        self.synced = 0
        self.closed = 0
        self._replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reading = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, plan: dict[str, Any]) -> Crowd:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.crowd",
            json.dumps(plan),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=64 << 20,  # a report holds every latency bucket
        )
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            message = json.loads(line)
            if "synced" in message:  # progress
                self.received = message["received"]
                self.synced = message["synced"]
                self.closed = message["closed"]
                continue
            if "ack" in message:  # what follows counts the new phase
                self.received = 0
            await self._replies.put(message)
        await self._replies.put({"exited": await self.process.wait()})

    async def reply(self, patience: float = 600) -> dict[str, Any]:
        async with asyncio.timeout(patience):
            message = await self._replies.get()
        if "exited" in message:
            raise RuntimeError(f"a crowd process exited with {message['exited']}")
        return message

    async def command(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(message) + "\n").encode())
        await self.process.stdin.drain()
        return await self.reply(60)

    async def phase(self, phase: bytes) -> None:
        await self.command({"phase": phase.decode()})

    async def report(self) -> dict[str, Any]:
        return (await self.command({"report": True}))["report"]  # type: ignore[no-any-return]

    async def quit(self) -> None:
        if self.process.returncode is None and self.process.stdin is not None:
            self.process.stdin.write(b'{"quit": true}\n')
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        self._reading.cancel()


def merge(latencies: Counter[int], report: dict[str, Any]) -> None:
    for bucket, count in report["latencies"].items():
        latencies[int(bucket)] += count


if __name__ == "__main__":
    import uvloop

    die_with_parent()
    uvloop.run(helper(json.loads(sys.argv[1])))
