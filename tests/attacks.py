"""Attacks on a real server, bounded in count and time, over loopback only.

The hardening tests (tests/e2e/test_hardening.py) assert that each fails;
`python -m benchmarks.attacks` runs the same probes and prints the figures
(RSS, open file descriptors, frames per member) for a before/after note.
Every address is on 127.0.0.0/8: a second loopback address (127.0.0.2)
plays a different client machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from .servers import Server

TIMEOUT = 10.0
ATTACKER = "127.0.0.2"
# 4,000 characters outside the BMP: the most memory one chat can take (about 16 KB).
WIDE_TEXT = "\U0001f600" * 4000


# --- what the server process holds ------------------------------------------------


def rss_mib(pid: int) -> float:
    """Resident memory of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def limit_fds(pid: int, limit: int) -> None:
    """Lower a running process's file descriptor limit (`prlimit`, as root)."""
    command = ["prlimit", "--pid", str(pid), f"--nofile={limit}:{limit}"]
    await asyncio.to_thread(subprocess.run, command, check=True)


def metric(server: Server, name: str) -> float:
    """One sample of the server's /metrics (`name` with its labels, as printed)."""
    import urllib.request

    with urllib.request.urlopen(server.http + "/metrics", timeout=TIMEOUT) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    raise AssertionError(f"no {name} in /metrics")


@dataclass
class Sampler:
    """Samples a value every `interval` s while running; keeps the peak."""

    probe: Any
    interval: float = 0.25
    peak: float = 0.0
    samples: list[float] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Sampler]:
        async def loop() -> None:
            while True:
                value = float(self.probe())
                self.samples.append(value)
                self.peak = max(self.peak, value)
                await asyncio.sleep(self.interval)  # the sampling period

        task = asyncio.create_task(loop())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def ws_connect(server: Server, path: str, source: str = "127.0.0.1") -> ClientConnection:
    return await asyncio.wait_for(
        connect(
            server.ws + path,
            ping_interval=None,
            max_size=None,
            max_queue=None,
            open_timeout=TIMEOUT,
            close_timeout=2,
            local_addr=(source, 0),
        ),
        TIMEOUT + 1,
    )


async def next_of(ws: ClientConnection, kind: str, within: float = TIMEOUT) -> dict[str, Any]:
    """Frames up to the first of type `kind`, which is returned."""
    async with asyncio.timeout(within):
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == kind:
                return frame  # type: ignore[no-any-return]


# --- 1. a memory flood through the history ------------------------------------------


async def flood(
    server: Server,
    seconds: float,
    connections: int = 10,
    rooms_each: int = 8,
    per_second: float = 18.0,
    text: str = WIDE_TEXT,
) -> int:
    """Anonymous clients, each in its own rooms, chatting long texts just under RATE_LIMIT
    (20 a second) for `seconds`; they read everything and leave. Returns the chats acked."""
    deadline = time.monotonic() + seconds

    async def one(index: int) -> int:
        ws = await ws_connect(server, "/ws")
        acked = 0
        try:
            await next_of(ws, "welcome")
            rooms = [f"flood-{index}-{k}" for k in range(rooms_each)]
            for room in rooms:
                await ws.send(json.dumps({"type": "join", "room": room}))
                await next_of(ws, "joined")

            async def read() -> None:
                nonlocal acked
                async for raw in ws:
                    acked += json.loads(raw)["type"] == "ack"

            reader = asyncio.create_task(read())
            sent = 0
            started = time.monotonic()
            while time.monotonic() < deadline:
                await ws.send(
                    json.dumps({"type": "chat", "room": rooms[sent % rooms_each], "text": text})
                )
                sent += 1
                # Paced under the rate limit: the next chat is due at sent / per_second.
                await asyncio.sleep(max(0.0, started + sent / per_second - time.monotonic()))
            await asyncio.sleep(0.5)  # the last acks are on their way
            reader.cancel()
        finally:
            await ws.close()
        return acked

    return sum(await asyncio.gather(*(one(i) for i in range(connections))))


async def replayed(server: Server, room: str, history: int = 1000) -> int:
    """How many stored messages a join with `history` replays."""
    ws = await ws_connect(server, f"/ws/{room}?history={history}")
    try:
        count = 0
        async with asyncio.timeout(TIMEOUT):
            while (frame := json.loads(await ws.recv()))["type"] != "joined":
                count += frame["type"] == "chat"
        return count
    finally:
        await ws.close()


# --- 2. half-finished handshakes ------------------------------------------------------


def half_handshakes(
    port: int, count: int, source: str = ATTACKER, within: float = 30.0
) -> list[socket.socket]:
    """`count` sockets that send the first line of an upgrade and never the rest.

    Connecting can fail once the server cuts sockets or its backlog is full: those
    attempts are left out (the attacker keeps what it got), and it gives up at `within`."""
    held = []
    deadline = time.monotonic() + within
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(1)
        try:
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET /ws HTTP/1.1\r\n")
        except OSError:
            sock.close()
            continue
        held.append(sock)
    return held


def still_open(sockets: list[socket.socket]) -> int:
    """How many of these sockets the server has not closed (a read would block)."""
    alive = 0
    for sock in sockets:
        sock.setblocking(False)
        try:
            data = sock.recv(4096)
            # A 408 answer comes before the close; read on to the end.
            while data:
                data = sock.recv(4096)
        except BlockingIOError:
            alive += 1
        except OSError:
            pass  # reset by the server: closed
    return alive


async def chatter(server: Server, room: str, stop: asyncio.Event, gap: float = 0.5) -> list[str]:
    """A real client that connects anew and chats every `gap` seconds until `stop`;
    what each attempt came to (`ok`, or why not)."""
    outcomes: list[str] = []
    while not stop.is_set():
        try:
            ws = await ws_connect(server, f"/ws/{room}")
            try:
                await next_of(ws, "joined", 5)
                await ws.send(json.dumps({"type": "chat", "text": "still here", "ref": "c"}))
                await next_of(ws, "ack", 5)
                outcomes.append("ok")
            finally:
                await ws.close()
        except Exception as exc:  # whatever failed, it is this attempt's outcome
            outcomes.append(type(exc).__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), gap)  # the pace of a person
    return outcomes


# --- 3. reconnect churn ---------------------------------------------------------------


async def churn(server: Server, room: str, cycles: int, source: str = ATTACKER) -> dict[str, int]:
    """Connect to `room` and close at once, `cycles` times, sending no frame; what the
    server answered (`welcome`, or the error code)."""
    answers: dict[str, int] = {}
    for _ in range(cycles):
        ws = await ws_connect(server, f"/ws/{room}", source)
        try:
            frame = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
            key = frame["code"] if frame["type"] == "error" else frame["type"]
            answers[key] = answers.get(key, 0) + 1
        finally:
            await ws.close()
    return answers


class Counting:
    """Clients that read everything in the background and count the frames."""

    def __init__(self, sockets: list[ClientConnection]) -> None:
        self.sockets = sockets
        self.counts = [0] * len(sockets)
        self._tasks = [asyncio.create_task(self._read(i)) for i in range(len(sockets))]

    async def _read(self, index: int) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for _ in self.sockets[index]:
                self.counts[index] += 1

    async def quiet(self, seconds: float = 1.0, within: float = 60.0) -> list[int]:
        """The counts once none changed for `seconds`."""
        async with asyncio.timeout(within):
            while True:
                before = list(self.counts)
                await asyncio.sleep(seconds)  # the quiet period being checked
                if self.counts == before:
                    return before

    async def close(self) -> None:
        for ws in self.sockets:
            await ws.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
