"""The load generator: its own process, uvloop and picows, so that the client side stays cheap.

`python -m benchmarks.loadgen '<json plan>'` prints one JSON object. The plan:

    {"url": "ws://127.0.0.1:PORT", "path": "/ws/bench", "dialect": "text" | "socketio",
     "subscribers": N, "stall_before": 0, "pid": SERVER_PID, "pad": 0,
     "deflate": false, "bind": ["127.0.0.2", …], "helpers": 0,
     "api": {"room": "bench", "key": API_KEY},
     "phases": [{"mode": "burst", "messages": M, "window": 32, "kind": "chat"},
                {"mode": "paced", "messages": M, "rate": 25}]}

N subscribers connect (`{i}` in `path` is the subscriber's number; from the
`bind` source addresses in turn; browser-like when `deflate`, see
`clients.py`; spread over `helpers` more processes, see `crowd.py`), then
one publisher. The publisher sends sync probes until every subscriber has
seen one, so every server's "joined" means the same thing: delivered to.
Then the server's RSS gives the idle memory per connection, and each phase
runs while the server's CPU time (of it and its descendants, from
/proc/PID/task/*/schedstat) is read around it. A chat's text is
`@<phase><monotonic ns>@` plus `pad` bytes; a notification (`kind`) is a
~1 KiB room notification published through the HTTP API with that marker
in its body; a subscriber takes the time of any frame holding it. Burst
keeps at most `window` messages per subscriber in flight (the server takes
them as fast as it delivers them); paced sends at `rate` per second. With
`stall_before` = K, the last subscriber (4 KiB receive buffer) stops
reading before phase K, and phases from K on count the others only.
A phase also reports how busy the busiest load-generator process was: near
100%, latency measures the clients rather than the server.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import uvloop

from .clients import HttpPublisher, Publisher, Run, Subscriber, connect, connect_all, percentiles
from .clients import http_publisher as open_http
from .crowd import Crowd, merge
from .procs import cpu_seconds, descendants, die_with_parent, memory, raise_nofile

QUIET = 3.0  # a phase ends when nothing arrived for this long


async def sync(run: Run, publisher: Publisher, subs: list[Subscriber], crowds: list[Crowd]) -> None:
    """Probe until every subscriber got one: everyone is in the room."""
    deadline = time.monotonic() + 60 + run.subscribers / 500
    n = 0
    while len(run.synced) + sum(c.synced for c in crowds) < run.subscribers:
        closed = Counter(s.close_code for s in subs if s.close_code)
        if time.monotonic() > deadline or closed or any(c.closed for c in crowds):
            synced = len(run.synced) + sum(c.synced for c in crowds)
            raise RuntimeError(
                f"only {synced} of {run.subscribers} joined; closed: {dict(closed)}, "
                f"{sum(c.closed for c in crowds)} in helper processes"
            )
        publisher.publish(f"#sync{n}".encode())
        n += 1
        await asyncio.sleep(0.1 + run.subscribers / 20000)


async def phase(
    run: Run,
    publisher: Publisher,
    http: HttpPublisher | None,
    subs: list[Subscriber],
    crowds: list[Crowd],
    spec: dict[str, Any],
    number: int,
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    messages = spec["messages"]
    n = run.active
    expected = messages * n
    run.reset(str(number % 10).encode())
    for crowd in crowds:
        await crowd.phase(run.phase)
    send = publisher.chat
    if spec.get("kind") == "notification":
        assert http is not None, "notifications need the plan's `api`"
        send = http.notify
    bytes0 = sum(s.bytes_received() for s in subs)
    sent = 0
    cpu0 = cpu_seconds(run.pids)
    own0 = time.process_time()
    start = time.perf_counter()
    if spec["mode"] == "burst":
        assert not crowds, "a burst runs in one process"
        window = spec.get("window", 32)
        next_at = 0

        def progress() -> None:
            nonlocal sent, next_at
            while sent < messages and run.received >= next_at:
                send()
                sent += 1
                next_at = (sent - window + 1) * n

        run.on_progress = progress
        progress()
    else:
        interval = 1.0 / spec["rate"]
        t0 = loop.time()

        def tick() -> None:
            nonlocal sent
            send()
            sent += 1
            if sent < messages:
                loop.call_at(t0 + sent * interval, tick)

        tick()
    last, quiet_since = -1, time.monotonic()
    limit = time.monotonic() + 60 + spec.get("messages", 0) / spec.get("rate", 100)
    while True:
        received = run.received + sum(c.received for c in crowds)
        if received >= expected:
            break
        await asyncio.sleep(0.01)
        now = time.monotonic()
        if received != last:
            last, quiet_since = received, now
        elif (sent >= messages and now - quiet_since > QUIET) or now > limit:
            break
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds(run.pids) - cpu0
    own_cpu = time.process_time() - own0
    run.on_progress = None
    wire = sum(s.bytes_received() for s in subs) - bytes0
    got, frame_bytes, latencies = run.received, run.frame_bytes, Counter(run.latencies)
    busiest = own_cpu
    for crowd in crowds:
        report = await crowd.report()
        busiest = max(busiest, report["cpu_s"])
        got += report["received"]
        frame_bytes += report["frame_bytes"]
        wire += report["wire_bytes"]
        merge(latencies, report)
    if http is not None and http.failures:
        raise RuntimeError(f"the HTTP API refused notifications: {http.failures}")
    return {
        "mode": spec["mode"],
        "kind": spec.get("kind", "chat"),
        "messages": messages,
        "sent": sent,
        "expected": expected,
        "deliveries": got,
        "lost": expected - got,
        "seconds": round(elapsed, 3),
        "deliveries_per_s": round(got / elapsed),
        "cpu_s": round(cpu, 3),
        "cpu_us_per_delivery": round(cpu / got * 1e6, 2) if got else float("nan"),
        # The load generator's main process only (helpers are not counted).
        "client_cpu_us_per_delivery": round(own_cpu / got * 1e6, 2) if got else float("nan"),
        "busiest_client_percent": round(100 * busiest / elapsed),
        **percentiles(latencies),
        "frame_bytes": round(frame_bytes / got) if got else 0,
        "wire_bytes": round(wire / got) if got else 0,
        "rss_after": memory(run.pids, "VmRSS"),
    }


def _shares(n: int, helpers: int) -> list[range]:
    """Subscribers 0..n-1 split into helpers + 1 contiguous ranges, this process first."""
    size = -(-n // (helpers + 1))
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


async def main(plan: dict[str, Any]) -> dict[str, Any]:
    n = plan["subscribers"]
    socketio = plan.get("dialect") == "socketio"
    deflate = plan.get("deflate", False)
    bind = plan.get("bind")
    run = Run(n)
    run.pids = descendants(plan["pid"])
    url = plan["url"] + plan["path"]
    shares = _shares(n, plan.get("helpers", 0))
    raise_nofile(len(shares[0]) + 200)
    rss0 = memory(run.pids, "VmRSS")
    started = time.perf_counter()
    connecting = time.monotonic()
    crowds = [
        await Crowd.start(
            {"url": url, "first": s.start, "count": len(s), "deflate": deflate, "bind": bind}
        )
        for s in shares[1:]
    ]
    stall_before = plan.get("stall_before", 0)
    assert not (stall_before and crowds), "the stalled subscriber is this process's"
    try:
        subs = await connect_all(
            run,
            url,
            shares[0],
            socketio=socketio,
            deflate=deflate,
            bind=bind,
            small_buffer=n - 1 if stall_before else None,
        )
        connected = time.monotonic()
        deflated = sum(s.deflate for s in subs)
        for crowd in crowds:
            info = await crowd.reply()
            connecting = min(connecting, info["started"])
            connected = max(connected, info["done"])
            deflated += info["deflated"]
        publisher = Publisher(run, socketio, plan.get("pad", 0))
        await connect(url.replace("{i}", str(n)), publisher, deflate=deflate)
        http = None
        if "api" in plan:
            http = await open_http(run, plan["url"], plan["api"]["room"], plan["api"]["key"])
        await sync(run, publisher, subs, crowds)
        report = await _measure(plan, run, publisher, http, subs, crowds, started)
    finally:
        for crowd in crowds:
            await crowd.quit()
    clients = n + 1 + (http is not None)  # the publisher's connections count too
    return report | {
        "connects_per_s": round(n / max(connected - connecting, 1e-6)),
        "deflated": deflated,
        "rss_before": rss0,
        "idle_kib_per_connection": round((report["rss_idle"] - rss0) / clients / 1024, 2),
    }


async def _measure(
    plan: dict[str, Any],
    run: Run,
    publisher: Publisher,
    http: HttpPublisher | None,
    subs: list[Subscriber],
    crowds: list[Crowd],
    started: float,
) -> dict[str, Any]:
    n = run.subscribers
    connect_s = time.perf_counter() - started
    await asyncio.sleep(plan.get("settle", 1.0))
    rss1 = memory(run.pids, "VmRSS")
    gate = plan.get("gate")
    if gate:  # tell the orchestrator we are ready (it starts a profiler), wait for its go
        # Another process answers through a file: there is nothing to await.
        Path(gate + ".ready").touch()  # noqa: ASYNC240
        while not Path(gate + ".go").exists():  # noqa: ASYNC110, ASYNC240
            await asyncio.sleep(0.02)
    stall_before = plan.get("stall_before", 0)
    victim = subs[-1]
    results = []
    for number, spec in enumerate(plan["phases"], start=1):
        if number == stall_before:  # the last subscriber stops reading from now on
            assert victim.transport is not None
            victim.stalled = True
            victim.transport.underlying_transport.pause_reading()
            run.active = n - 1
        results.append(await phase(run, publisher, http, subs, crowds, spec, number))
        await asyncio.sleep(0.1)
    report: dict[str, Any] = {
        "subscribers": n,
        "connect_s": round(connect_s, 2),
        "rss_idle": rss1,
        "peak_rss": memory(run.pids, "VmHWM"),
        "phases": results,
    }
    if stall_before:
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
    if http is not None and http.transport is not None:
        http.transport.close()
    await asyncio.sleep(0.2)
    return report


if __name__ == "__main__":
    die_with_parent()
    result = uvloop.run(main(json.loads(sys.argv[1])))
    sys.stdout.write(json.dumps(result) + "\n")
