"""One stalled client among N: paced chats with big frames, first with every subscriber
reading, then, on the same server and connections, with one that stopped reading; the
others' latency in the second window is compared with the first (both after a warm-up)."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass
from typing import Any

from . import servers
from .harness import loadgen, say
from .servers import BASELINES, ROOMCAST, Running

N = 1000
STALL_OUTBOX = 64
# Big frames, so that a client that stops reading fills the kernel's buffers (Linux
# grows a send buffer up to tcp_wmem's 4 MiB when the peer's window is what limits it)
# and uvicorn's (64 KiB) within the run.
STALL_PAD = 3900
STALL_RATE = 25


@dataclass
class Stall:
    name: str
    p99_ms: float
    p99_stalled_ms: float
    p99_ratio: float
    lost: int
    rss_growth_kib: float  # during the window, without the stall
    rss_growth_stalled_kib: float
    stalled_frames: int
    stalled_fate: str
    frame_bytes: int
    slow_consumers: int | None


def _slow_consumers(running: Running) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{running.port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("roomcast_slow_consumers_total"):
            return int(float(line.split()[1]))
    return None


def stall(messages: int, settle: float, full: bool) -> list[Stall]:
    window = {"mode": "paced", "messages": messages, "rate": STALL_RATE}
    roomcast = ROOMCAST.but(env={**ROOMCAST.env, "OUTBOX_SIZE": str(STALL_OUTBOX)})
    out = []
    # bare ASGI in a full run: it shows what a sequential `await send` does with a stall.
    for spec in (roomcast, BASELINES[0]) if full else (roomcast,):
        say(f"stall: {spec.name}")
        running = servers.start(spec.but(pad=STALL_PAD))
        slow = None
        try:
            report = loadgen(
                running,
                {
                    "subscribers": N,
                    "stall_before": 3,
                    "settle": settle,
                    # Long enough for roomcast's 10 s close grace (DROP_TIMEOUT) in a full run.
                    "stall_wait": 12.0 if full else 1.0,
                    # A first, shorter window warms the server up (its buffers grow to the
                    # big frames): the two measured windows both come after it.
                    "phases": [{**window, "messages": messages // 5}, window, window],
                },
            )
            if spec is roomcast:
                slow = _slow_consumers(running)
        finally:
            running.stop()
        out.append(_result(spec.name, report, slow))
    return out


def _result(name: str, report: dict[str, Any], slow: int | None) -> Stall:
    warm, calm, bad = report["phases"]
    fate = report.get("stalled", {})
    if fate.get("close_code"):
        what = f"closed {fate['close_code']}"
    elif fate.get("disconnected"):
        what = "disconnected"
    else:
        what = "still open at the end"
    return Stall(
        name=name,
        p99_ms=calm["p99_ms"],
        p99_stalled_ms=bad["p99_ms"],
        p99_ratio=round(bad["p99_ms"] / calm["p99_ms"], 2),
        lost=calm["lost"] + bad["lost"],
        rss_growth_kib=round((calm["rss_after"] - warm["rss_after"]) / 1024),
        rss_growth_stalled_kib=round((bad["rss_after"] - calm["rss_after"]) / 1024),
        stalled_frames=fate.get("frames", 0),
        stalled_fate=what,
        frame_bytes=bad["frame_bytes"],
        slow_consumers=slow,
    )


def table(stalls: list[Stall], n: int) -> str:
    out = [
        f"### One stalled client among {n}\n",
        f"Paced {STALL_RATE} chats/s with ~{STALL_PAD}-byte frames, so that a client that "
        "stops reading fills the kernel's buffers (Linux lets a send buffer grow to 4 MiB "
        "when the peer's window limits it) and uvicorn's within the run; roomcast with "
        f"OUTBOX_SIZE={STALL_OUTBOX}. One server, one set of connections: a short window to "
        "warm up, then two windows of the same length, every subscriber reading, then one "
        "that stopped (its frames of the first window count, those of the second do not). "
        "RSS growth: the server's VmRSS at the end of a window less at its start.\n",
        "| server | others' p99 ms, no stall | with a stall | ratio | lost | RSS growth KiB, "
        "no stall | with a stall | outbox bound KiB | stalled client | slow consumers |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for s in stalls:
        bound = round(STALL_OUTBOX * s.frame_bytes / 1024) if s.name == "roomcast" else "none"
        out.append(
            f"| {s.name} | {s.p99_ms} | {s.p99_stalled_ms} | {s.p99_ratio} | {s.lost} "
            f"| {s.rss_growth_kib} | {s.rss_growth_stalled_kib} | {bound} "
            f"| {s.stalled_frames} frames, {s.stalled_fate} "
            f"| {'' if s.slow_consumers is None else s.slow_consumers} |"
        )
    if stalls and not stalls[0].slow_consumers:
        out.append(
            "\nThe stalled client did not reach its outbox within this window (the kernel's "
            "buffers took everything sent to it); a full run sends enough for that."
        )
    return "\n".join(out)
