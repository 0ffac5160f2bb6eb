"""The load generator: its own process, uvloop and picows, so that the client side stays cheap.

`python -m benchmarks.loadgen '<json plan>'` prints one JSON object. The plan:

    {"url": "ws://127.0.0.1:PORT", "path": "/ws/bench", "dialect": "text" | "socketio",
     "subscribers": N, "stall": false, "pid": SERVER_PID, "pad": 0,
     "phases": [{"mode": "burst", "messages": M, "window": 32},
                {"mode": "paced", "messages": M, "rate": 25}]}

N subscribers connect (`{i}` in `path` is the subscriber's number), then one
publisher. The publisher sends sync probes until every subscriber has seen
one, so every server's "joined" means the same thing: delivered to. Then the
server's RSS gives the idle memory per connection, and each phase runs while
the server's CPU time (of it and its descendants, from /proc/PID/task/*/schedstat)
is read around it. A chat's text is `@<phase><monotonic ns>@` plus `pad` bytes;
a subscriber takes the time of any frame holding it. Burst keeps at most
`window` messages per subscriber in flight (the server takes them as fast as
it delivers them); paced sends at `rate` per second.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

PAGE = os.sysconf("SC_PAGE_SIZE")
QUIET = 3.0  # a phase ends when nothing arrived for this long
CONNECT_BATCH = 100


def descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """CPU time of the processes' threads, in nanoseconds from the scheduler (utime +
    stime in /proc/PID/stat only count clock ticks of 10 ms)."""
    total = 0
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
            except OSError:  # a thread that just ended
                pass
    return total / 1e9


def memory(pids: list[int], key: str) -> int:
    """Sum of a /proc/PID/status field (VmRSS, VmHWM) in bytes."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    total += int(line.split()[1]) * 1024
    return total


class Run:
    """Shared counters of the current phase; the callbacks touch only these."""

    def __init__(self, subscribers: int) -> None:
        self.subscribers = subscribers
        self.active = subscribers
        self.phase = b"0"
        self.received = 0
        self.frame_bytes = 0
        self.latencies: list[int] = []
        self.synced: set[int] = set()
        self.last_progress = time.monotonic()
        self.on_progress: Any = None  # the burst publisher's callback
        self.pids: list[int] = []


class Subscriber(WSListener):  # type: ignore[misc]
    def __init__(self, run: Run, number: int, socketio: bool, stalled: bool = False) -> None:
        self.run = run
        self.number = number
        self.socketio = socketio
        self.stalled = stalled
        self.transport: WSTransport | None = None
        self.ready = asyncio.get_running_loop().create_future()
        self.frames = 0
        self.close_code: int | None = None
        if not socketio:
            self.ready.set_result(None)

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.TEXT:
            payload = frame.get_payload_as_bytes()
            self.frames += 1
            at = payload.find(b"@")
            run = self.run
            if at >= 0:
                if self.stalled or payload[at + 1 : at + 2] != run.phase:
                    return
                end = payload.find(b"@", at + 2)
                run.latencies.append(time.monotonic_ns() - int(payload[at + 2 : end]))
                run.received += 1
                run.frame_bytes += len(payload)
                if run.on_progress is not None:
                    run.on_progress()
            elif payload.find(b"#sync") >= 0:
                run.synced.add(self.number)
            elif self.socketio:
                self._engineio(transport, payload)
        elif kind == WSMsgType.CLOSE:
            self.close_code = frame.get_close_code()
            transport.disconnect()

    def _engineio(self, transport: WSTransport, payload: bytes) -> None:
        if payload == b"2":  # Engine.IO ping
            transport.send(WSMsgType.TEXT, b"3")
        elif payload.startswith(b"0{"):  # Engine.IO open: connect to the namespace
            transport.send(WSMsgType.TEXT, b"40")
        elif payload.startswith(b"40") and not self.ready.done():
            self.ready.set_result(None)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("disconnected before ready"))


class Publisher(Subscriber):
    def __init__(self, run: Run, socketio: bool, pad: int) -> None:
        super().__init__(run, -1, socketio)
        self.pad = b"x" * pad

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            payload = frame.get_payload_as_bytes()
            if self.socketio and payload.find(b"@") < 0 and payload.find(b"#sync") < 0:
                self._engineio(transport, payload)

    def publish(self, text: bytes) -> None:
        assert self.transport is not None
        if self.socketio:
            text = b'42["msg","' + text + b'"]'
        self.transport.send(WSMsgType.TEXT, text)

    def chat(self) -> None:
        self.publish(b"@" + self.run.phase + str(time.monotonic_ns()).encode() + b"@" + self.pad)


def _small_buffer_socket(url: Any) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that stops reading
    sock.connect((url.host, url.port))
    sock.setblocking(False)
    return sock


async def connect(url: str, listener: Subscriber, small_buffer: bool = False) -> Subscriber:
    kwargs: dict[str, Any] = {"max_frame_size": 1 << 24}
    if small_buffer:
        kwargs["socket_factory"] = _small_buffer_socket
    await ws_connect(lambda: listener, url, **kwargs)
    await asyncio.wait_for(listener.ready, 30)
    return listener


async def sync(
    run: Run, publisher: Publisher, subs: list[Subscriber], patience: float = 60.0
) -> None:
    """Probe until every subscriber got one: everyone is in the room."""
    deadline = time.monotonic() + patience
    n = 0
    while len(run.synced) < run.subscribers:
        if time.monotonic() > deadline or any(s.close_code for s in subs):
            closed = Counter(s.close_code for s in subs if s.close_code)
            raise RuntimeError(
                f"only {len(run.synced)} of {run.subscribers} joined; closed: {dict(closed)}"
            )
        publisher.publish(f"#sync{n}".encode())
        n += 1
        await asyncio.sleep(0.1 + run.subscribers / 20000)


async def phase(
    run: Run, publisher: Publisher, spec: dict[str, Any], number: int
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    messages = spec["messages"]
    n = run.active
    expected = messages * n
    run.phase = str(number % 10).encode()
    run.received = 0
    run.frame_bytes = 0
    run.latencies = []
    sent = 0
    cpu0 = cpu_seconds(run.pids)
    own0 = time.process_time()
    start = time.perf_counter()
    if spec["mode"] == "burst":
        window = spec.get("window", 32)
        next_at = 0

        def progress() -> None:
            nonlocal sent, next_at
            while sent < messages and run.received >= next_at:
                publisher.chat()
                sent += 1
                next_at = (sent - window + 1) * n

        run.on_progress = progress
        progress()
    else:
        interval = 1.0 / spec["rate"]
        t0 = loop.time()

        def tick() -> None:
            nonlocal sent
            publisher.chat()
            sent += 1
            if sent < messages:
                loop.call_at(t0 + sent * interval, tick)

        tick()
    last, quiet_since = -1, time.monotonic()
    limit = time.monotonic() + 60 + spec.get("messages", 0) / spec.get("rate", 100)
    while run.received < expected:
        await asyncio.sleep(0.01)
        now = time.monotonic()
        if run.received != last:
            last, quiet_since = run.received, now
        elif (sent >= messages and now - quiet_since > QUIET) or now > limit:
            break
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds(run.pids) - cpu0
    run.on_progress = None
    lat = sorted(run.latencies)
    got = run.received

    def pct(q: float) -> float:
        return round(lat[min(len(lat) - 1, int(len(lat) * q))] / 1e6, 2) if lat else float("nan")

    return {
        "mode": spec["mode"],
        "messages": messages,
        "sent": sent,
        "expected": expected,
        "deliveries": got,
        "lost": expected - got,
        "seconds": round(elapsed, 3),
        "deliveries_per_s": round(got / elapsed),
        "cpu_s": round(cpu, 3),
        "cpu_us_per_delivery": round(cpu / got * 1e6, 2) if got else float("nan"),
        "client_cpu_us_per_delivery": round((time.process_time() - own0) / got * 1e6, 2)
        if got
        else float("nan"),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": round(lat[-1] / 1e6, 2) if lat else float("nan"),
        "frame_bytes": round(run.frame_bytes / got) if got else 0,
        "rss_after": memory(run.pids, "VmRSS"),
    }


async def main(plan: dict[str, Any]) -> dict[str, Any]:
    n = plan["subscribers"]
    socketio = plan.get("dialect") == "socketio"
    run = Run(n)
    run.pids = descendants(plan["pid"])
    path: str = plan["path"]
    url = plan["url"] + path
    rss0 = memory(run.pids, "VmRSS")
    started = time.perf_counter()
    subs: list[Subscriber] = []
    stalled = plan.get("stall", False)
    for first in range(0, n, CONNECT_BATCH):
        batch = [
            connect(
                url.replace("{i}", str(i)),
                Subscriber(run, i, socketio, stalled=stalled and i == n - 1),
                small_buffer=stalled and i == n - 1,
            )
            for i in range(first, min(n, first + CONNECT_BATCH))
        ]
        subs += await asyncio.gather(*batch)
    publisher = Publisher(run, socketio, plan.get("pad", 0))
    await connect(url.replace("{i}", str(n)), publisher)
    await sync(run, publisher, subs)
    connect_s = time.perf_counter() - started
    await asyncio.sleep(plan.get("settle", 1.0))
    rss1 = memory(run.pids, "VmRSS")
    gate = plan.get("gate")
    if gate:  # tell the orchestrator we are ready (it starts a profiler), wait for its go
        # Another process answers through a file: there is nothing to await.
        Path(gate + ".ready").touch()  # noqa: ASYNC240
        while not Path(gate + ".go").exists():  # noqa: ASYNC110, ASYNC240
            await asyncio.sleep(0.02)
    if stalled:
        victim = subs[-1]
        assert victim.transport is not None
        victim.transport.underlying_transport.pause_reading()
        run.active = n - 1
    results = []
    for number, spec in enumerate(plan["phases"], start=1):
        results.append(await phase(run, publisher, spec, number))
        await asyncio.sleep(0.3)
    report: dict[str, Any] = {
        "subscribers": n,
        "connect_s": round(connect_s, 2),
        "rss_before": rss0,
        "rss_idle": rss1,
        "idle_kib_per_connection": round((rss1 - rss0) / (n + 1) / 1024, 2),
        "peak_rss": memory(run.pids, "VmHWM"),
        "phases": results,
    }
    if stalled:
        victim = subs[-1]
        assert victim.transport is not None
        victim.transport.underlying_transport.resume_reading()
        await asyncio.sleep(plan.get("stall_wait", 2.0))
        report["stalled"] = {
            "frames": victim.frames,
            "close_code": victim.close_code,
            "disconnected": victim.transport.is_disconnected,
        }
    for sub in [*subs, publisher]:
        if sub.transport is not None and not sub.transport.is_disconnected:
            sub.transport.disconnect()
    await asyncio.sleep(0.2)
    return report


if __name__ == "__main__":
    result = uvloop.run(main(json.loads(sys.argv[1])))
    sys.stdout.write(json.dumps(result) + "\n")
