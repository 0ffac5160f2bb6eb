"""One stalled client among N: paced chats with big frames; one subscriber stops reading
after it joined, and the others' latency is compared with a run without it."""

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
    phases = [{"mode": "paced", "messages": messages, "rate": STALL_RATE}]
    out = []
    roomcast = ROOMCAST.but(env={**ROOMCAST.env, "OUTBOX_SIZE": str(STALL_OUTBOX)})
    # bare ASGI only with the stall: it shows what a sequential `await send` does then.
    for spec, cases in ((roomcast, (False, True)), (BASELINES[0], (True,))):
        if spec is not roomcast and not full:
            continue
        runs: dict[bool, dict[str, Any]] = {}
        slow = None
        for stalled in cases:
            say(f"stall: {spec.name}, stalled={stalled}")
            running = servers.start(spec.but(pad=STALL_PAD))
            try:
                runs[stalled] = loadgen(
                    running,
                    {
                        "subscribers": N,
                        "stall": stalled,
                        "settle": settle,
                        # Long enough for roomcast's 10 s close grace (DROP_TIMEOUT) in a full run.
                        "stall_wait": 12.0 if full else 1.0,
                        "phases": phases,
                    },
                )
                if stalled and spec is roomcast:
                    slow = _slow_consumers(running)
            finally:
                running.stop()
        out.append(_result(spec.name, runs, slow))
    return out


def _result(name: str, runs: dict[bool, dict[str, Any]], slow: int | None) -> Stall:
    bad = runs[True]
    calm = runs.get(False)
    fate = bad.get("stalled", {})
    if fate.get("close_code"):
        what = f"closed {fate['close_code']}"
    elif fate.get("disconnected"):
        what = "disconnected"
    else:
        what = "still open at the end"

    def growth(report: dict[str, Any]) -> int:
        return round((report["phases"][0]["rss_after"] - report["rss_idle"]) / 1024)

    p99 = calm["phases"][0]["p99_ms"] if calm else float("nan")
    return Stall(
        name=name,
        p99_ms=p99,
        p99_stalled_ms=bad["phases"][0]["p99_ms"],
        p99_ratio=round(bad["phases"][0]["p99_ms"] / p99, 2) if calm else float("nan"),
        lost=bad["phases"][0]["lost"],
        rss_growth_kib=growth(calm) if calm else 0,
        rss_growth_stalled_kib=growth(bad),
        stalled_frames=fate.get("frames", 0),
        stalled_fate=what,
        frame_bytes=bad["phases"][0]["frame_bytes"],
        slow_consumers=slow,
    )


def table(stalls: list[Stall], n: int) -> str:
    out = [
        f"### One stalled client among {n}\n",
        f"Paced {STALL_RATE} chats/s with ~{STALL_PAD}-byte frames, so that a client that "
        "stops reading fills the kernel's buffers (Linux lets a send buffer grow to 4 MiB "
        "when the peer's window limits it) and uvicorn's within the run; roomcast with "
        f"OUTBOX_SIZE={STALL_OUTBOX}. The same run without the stalled client is the "
        "reference. RSS growth: the server's VmRSS at the end "
        "of the window less at its start.\n",
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
