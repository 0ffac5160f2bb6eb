"""Fan-out in one room: roomcast against six baselines, with one load generator.

The load generator (`benchmarks/loadgen.py`) is its own process on uvloop and
picows. N subscribers join one room; one publisher sends chats either in a
burst (as fast as the server delivers them: at most WINDOW messages per
subscriber in flight) or paced (RATE per second). Every delivered frame
carries its send time. The server's CPU time (from the scheduler's
/proc/PID/task/*/schedstat, its worker processes included) is read around each phase
and divided by the frames delivered to the N subscribers; idle memory per
connection is the server's VmRSS after the N connections joined, less
before, over N; peak is VmHWM.

The baselines, in `benchmarks/baselines/`, each as its authors show it:
a bare ASGI app (a list of `send`s and a sequential `await send`: the floor
of the ASGI path), the FastAPI tutorial's `ConnectionManager`,
encode/broadcaster's README chat example (memory://), python-socketio rooms
(the client speaks Engine.IO v4 over a WebSocket), the `websockets`
library's own server with `websockets.broadcast()`, and a raw picows server
(its Cython protocol, one `send` per recipient). The ASGI ones run under the
same uvicorn command line as roomcast. Their frames are padded to the
length of roomcast's chat envelopes. The machine is shared: servers are
interleaved round by round and each figure is the median of the rounds;
compare ratios within one run, not figures across runs. The burst's rounds
are listed too: the load generator shares the two cores with the server,
and roomcast's cost per delivery depends on how many frames go out in one
write, so on the load generator's pace: its rounds can differ by up to 2x.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from . import servers
from .harness import loadgen, measure, ratio, say
from .profiling import Profile, profile
from .profiling import table as profile_table
from .servers import BASELINES, ROOMCAST, Running
from .stall import Stall, stall
from .stall import table as stall_table

N = 1000
WINDOW = 32
RATE = 25
# A quick run (under 2 minutes in all) measures the baselines of issue 12's targets, and
# the FastAPI tutorial: python-socketio alone would take a tenth of it.
QUICK_BASELINES = ("bare ASGI", "websockets.broadcast()", "raw picows", "FastAPI tutorial")


@dataclass
class Plan:
    rounds: int
    burst: int  # messages
    paced: int  # messages at RATE/s
    stall_messages: int
    profile_seconds: float
    full: bool  # also roomcast's other WebSocket implementations, all baselines, Redis
    settle: float  # seconds between the last join and the idle memory reading

    @classmethod
    def of(cls, quick: bool) -> Plan:
        if quick:
            return cls(1, 50, 25, 75, 2.0, False, 0.3)
        return cls(3, 200, 100, 1250, 8.0, True, 1.0)


# --- the comparison: roomcast, its WebSocket implementations, the baselines ----------------


@dataclass
class Row:
    name: str
    cpu_us: float  # burst, per delivery
    deliveries_per_s: float  # burst
    lost: int  # burst + paced, summed over rounds
    p50_ms: float  # paced
    p99_ms: float
    max_ms: float
    idle_kib: float
    peak_mib: float
    frame_bytes: int
    client_cpu_us: float
    rounds: list[dict[str, Any]] = field(default_factory=list, repr=False)


def _row(name: str, reports: list[dict[str, Any]]) -> Row:
    def med(phase: int, key: str) -> float:
        values: list[float] = [r["phases"][phase][key] for r in reports]
        return round(statistics.median(values), 2)

    return Row(
        name=name,
        cpu_us=med(0, "cpu_us_per_delivery"),
        deliveries_per_s=round(med(0, "deliveries_per_s")),
        lost=sum(p["lost"] for r in reports for p in r["phases"]),
        p50_ms=med(1, "p50_ms"),
        p99_ms=med(1, "p99_ms"),
        max_ms=med(1, "max_ms"),
        idle_kib=round(statistics.median(r["idle_kib_per_connection"] for r in reports), 1),
        peak_mib=round(statistics.median(r["peak_rss"] for r in reports) / 2**20, 1),
        frame_bytes=int(med(0, "frame_bytes")),
        client_cpu_us=med(0, "client_cpu_us_per_delivery"),
        rounds=reports,
    )


def compare(plan: Plan) -> list[Row]:
    variants = [
        ROOMCAST.but(name="roomcast, --ws websockets", ws="websockets"),
        ROOMCAST.but(name="roomcast, --ws wsproto", ws="wsproto"),
    ]
    baselines = [b for b in BASELINES if plan.full or b.name in QUICK_BASELINES]
    specs = [ROOMCAST, *(variants if plan.full else []), *baselines]
    phases = [
        {"mode": "burst", "messages": plan.burst, "window": WINDOW},
        {"mode": "paced", "messages": plan.paced, "rate": RATE},
    ]
    reports: dict[str, list[dict[str, Any]]] = {s.name: [] for s in specs}
    for round_ in range(plan.rounds):
        # A different order each round, so a noisy moment does not always hit the same server.
        shift = round_ * 3 % len(specs)
        for spec in specs[shift:] + specs[:shift]:
            say(f"fan-out round {round_ + 1}: {spec.name}")
            reports[spec.name].append(
                measure(spec, {"subscribers": N, "settle": plan.settle, "phases": phases})
            )
    return [_row(name, r) for name, r in reports.items()]


# --- 2 workers over Redis ------------------------------------------------------------------


@dataclass
class Workers:
    name: str
    workers: int
    cpu_us: float
    deliveries_per_s: int
    p99_ms: float
    lost: int


def workers(plan: Plan) -> list[Workers]:
    from tests.brokers import start_redis
    from tests.servers import start_server

    redis = start_redis()
    out = []
    try:
        for count in (1, 2):
            say(f"redis: {count} worker(s)")
            env = {**ROOMCAST.env, "BROADCAST_URL": f"{redis.url}?prefix=b{time.time_ns()}"}
            server = start_server(servers.environment(env), ["--workers", str(count)])
            running = Running(ROOMCAST, server.process, server.port, server.log_path)
            try:
                report = loadgen(
                    running,
                    {
                        "subscribers": N,
                        "settle": plan.settle,
                        "phases": [
                            {"mode": "burst", "messages": plan.burst, "window": WINDOW},
                            {"mode": "paced", "messages": plan.paced, "rate": RATE},
                        ],
                    },
                )
            finally:
                server.terminate()
            burst, paced = report["phases"]
            out.append(
                Workers(
                    name=f"roomcast serve --workers {count}, Redis",
                    workers=count,
                    cpu_us=burst["cpu_us_per_delivery"],
                    deliveries_per_s=burst["deliveries_per_s"],
                    p99_ms=paced["p99_ms"],
                    lost=burst["lost"] + paced["lost"],
                )
            )
    finally:
        redis.stop()
    return out


# --- the section -----------------------------------------------------------------------------


@dataclass
class Results:
    compare: list[Row]
    stall: list[Stall]
    workers: list[Workers]
    profile: Profile
    seconds: float = 0.0


def run(quick: bool = False) -> Results:
    plan = Plan.of(quick)
    started = time.monotonic()
    rows = compare(plan)
    stalls = stall(plan.stall_messages, plan.settle, plan.full)
    two = workers(plan) if plan.full else []
    say("profile")
    results = Results(rows, stalls, two, profile(N, WINDOW, plan.profile_seconds))
    results.seconds = round(time.monotonic() - started, 1)
    return results


def table(r: Results) -> str:
    rows = {row.name: row for row in r.compare}
    rc, bare = rows["roomcast"], rows["bare ASGI"]
    out = [
        f"N = {N} subscribers in one room, 1 worker. Burst: CPU per delivery and "
        f"deliveries/s (window {WINDOW}); paced: {RATE} chats/s, publish-to-receive latency. "
        "Ratios: this server's figure ÷ roomcast's, and ÷ bare ASGI's "
        "(CPU and memory: lower is better).\n",
        "| server | CPU µs/delivery | rounds | vs roomcast | vs bare | deliveries/s | lost "
        "| p50 ms | p99 ms | p99 vs roomcast | max ms | idle KiB/conn | vs roomcast | vs bare "
        "| peak MiB | frame bytes | client µs/delivery |",
        "| --- |" + " ---: |" * 16,
    ]
    for row in r.compare:
        rounds = " / ".join(str(x["phases"][0]["cpu_us_per_delivery"]) for x in row.rounds)
        out.append(
            f"| {row.name} | {row.cpu_us} | {rounds} | {ratio(row.cpu_us, rc.cpu_us)} "
            f"| {ratio(row.cpu_us, bare.cpu_us)} | {row.deliveries_per_s} | {row.lost} "
            f"| {row.p50_ms} | {row.p99_ms} | {ratio(row.p99_ms, rc.p99_ms)} | {row.max_ms} "
            f"| {row.idle_kib} | {ratio(row.idle_kib, rc.idle_kib)} "
            f"| {ratio(row.idle_kib, bare.idle_kib)} | {row.peak_mib} | {row.frame_bytes} "
            f"| {row.client_cpu_us} |"
        )
    out.append("\n" + stall_table(r.stall, N))
    out += [
        "\n### Two workers over Redis\n",
        f"`roomcast serve` with BROADCAST_URL (and so HISTORY_URL) on one Redis, N = {N} "
        "spread over the workers by the kernel; CPU summed over every worker process "
        "(Redis excluded).\n",
    ]
    if r.workers:
        out += [
            "| setup | CPU µs/delivery | deliveries/s | paced p99 ms | lost |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        out += [
            f"| {w.name} | {w.cpu_us} | {w.deliveries_per_s} | {w.p99_ms} | {w.lost} |"
            for w in r.workers
        ]
    else:
        out.append("Measured in a full run only.")
    out.append("\n" + profile_table(r.profile, N))
    return "\n".join(out)


def as_json(r: Results) -> dict[str, Any]:
    return asdict(r)
