"""Fan-out in one room: roomcast against five baselines, with one load generator.

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
of the ASGI path roomcast runs on), the FastAPI tutorial's
`ConnectionManager`, encode/broadcaster's README chat example (memory://),
python-socketio rooms (the client speaks Engine.IO v4 over a WebSocket) and
the `websockets` library's own server with `websockets.broadcast()`. The ASGI
ones run under the same uvicorn command line as roomcast. Their frames are
padded to the length of roomcast's chat envelopes. The machine is shared:
servers are interleaved round by round and each figure is the median of
the rounds; compare ratios within one run, not figures across runs.
"""

from __future__ import annotations

import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import servers
from .servers import BASELINES, ROOMCAST, Running, Spec

N = 1000
WINDOW = 32
RATE = 25


@dataclass
class Plan:
    rounds: int
    burst: int  # messages
    paced: int  # messages at RATE/s
    stall_messages: int
    idle_connections: int
    profile_seconds: float
    full: bool  # also roomcast's other WebSocket implementations, and bare ASGI stalled
    settle: float  # seconds between the last join and the idle memory reading

    @classmethod
    def of(cls, quick: bool) -> Plan:
        if quick:
            return cls(1, 50, 30, 75, 2_000, 2.0, False, 0.5)
        return cls(3, 200, 100, 1250, 10_000, 8.0, True, 1.0)


_T0 = time.monotonic()


def say(what: str) -> None:
    print(f"  {time.monotonic() - _T0:6.1f} s  {what}", file=sys.stderr, flush=True)


def loadgen(running: Running, plan: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    plan = {
        "url": running.url,
        "path": running.spec.path,
        "dialect": running.spec.dialect,
        "pad": running.spec.pad,
        "pid": running.process.pid,
        **plan,
    }
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.loadgen", json.dumps(plan)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=servers.environment(),
        cwd=servers.ROOT,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed against {running.spec.name}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def measure(spec: Spec, plan: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    running = servers.start(spec, env)
    try:
        return loadgen(running, plan)
    finally:
        running.stop()


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
        return round(statistics.median(r["phases"][phase][key] for r in reports), 2)

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
    specs = [ROOMCAST, *(variants if plan.full else []), *BASELINES]
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


# --- one stalled client among N ------------------------------------------------------------

STALL_OUTBOX = 64
# Big frames, so that a client that stops reading fills the kernel's buffers (Linux
# grows a send buffer up to tcp_wmem's 4 MiB when the peer's window is what limits it)
# and uvicorn's (64 KiB) within the run.
STALL_PAD = 3900
STALL_RATE = RATE


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


def stall(plan: Plan) -> list[Stall]:
    """Paced chats with big frames; one subscriber stops reading after it joined."""
    phases = [{"mode": "paced", "messages": plan.stall_messages, "rate": STALL_RATE}]
    out = []
    roomcast = ROOMCAST.but(env={**ROOMCAST.env, "OUTBOX_SIZE": str(STALL_OUTBOX)})
    # bare ASGI only with the stall: it shows what a sequential `await send` does then.
    for spec, cases in ((roomcast, (False, True)), (BASELINES[0], (True,))):
        if spec is not roomcast and not plan.full:
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
                        "settle": plan.settle,
                        # Long enough for roomcast's 10 s close grace (DROP_TIMEOUT) in a full run.
                        "stall_wait": 12.0 if plan.full else 1.0,
                        "phases": phases,
                    },
                )
                if stalled and spec is roomcast:
                    slow = _slow_consumers(running)
            finally:
                running.stop()
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
        out.append(
            Stall(
                name=spec.name,
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
        )
    return out


# --- 10,000 idle connections ---------------------------------------------------------------


@dataclass
class Idle:
    name: str
    connections: int
    connect_s: float
    idle_kib: float
    peak_mib: float
    cpu_us: float
    lost: int


def idle(plan: Plan) -> list[Idle]:
    out = []
    for spec in (ROOMCAST, BASELINES[0]):
        say(f"idle: {spec.name}")
        report = measure(
            spec,
            {
                "subscribers": plan.idle_connections,
                "settle": 2.0,
                "phases": [{"mode": "burst", "messages": 5, "window": 2}],
            },
        )
        phase = report["phases"][0]
        out.append(
            Idle(
                name=spec.name,
                connections=plan.idle_connections,
                connect_s=report["connect_s"],
                idle_kib=report["idle_kib_per_connection"],
                peak_mib=round(report["peak_rss"] / 2**20, 1),
                cpu_us=phase["cpu_us_per_delivery"],
                lost=phase["lost"],
            )
        )
    return out


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


# --- where roomcast's time goes ------------------------------------------------------------


@dataclass
class Profile:
    samples: int
    by_function: list[tuple[str, float]]
    by_area: list[tuple[str, float]]


AREAS = [  # first match wins: (substring of the frame's file, area)
    ("service/engine/sequencer.py", "roomcast hub fan-out"),
    ("service/engine/hub.py", "roomcast hub fan-out"),
    ("service/engine/connection.py", "roomcast outbox and sender"),
    ("service/engine/wire.py", "roomcast outbox and sender"),
    ("service/web/sockets.py", "roomcast socket edge (decode, dispatch)"),
    ("service/", "roomcast other (history, envelopes, transport)"),
    ("broadcaster/", "broadcaster memory backend"),
    ("starlette/", "Starlette (WebSocket, routing)"),
    ("uvicorn/", "uvicorn WebSocket protocol (send, framing, flow control)"),
    ("websockets/", "websockets sans-I/O framing"),
    ("asyncio/", "asyncio (tasks, futures, events)"),
]


def profile(plan: Plan) -> Profile:
    """py-spy samples the roomcast server during a burst, once every subscriber joined
    (py-spy leaves idle samples out)."""
    running = servers.start(ROOMCAST)
    work = Path(tempfile.mkdtemp())
    raw, gate = work / "raw.txt", work / "gate"
    messages = int(plan.profile_seconds * 80)
    spec = {
        "url": running.url,
        "path": running.spec.path,
        "pad": running.spec.pad,
        "pid": running.process.pid,
        "subscribers": N,
        "settle": 0.5,
        "gate": str(gate),
        "phases": [{"mode": "burst", "messages": messages, "window": WINDOW}],
    }
    try:
        generator = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.loadgen", json.dumps(spec)],
            stdout=subprocess.DEVNULL,
            env=servers.environment(),
            cwd=servers.ROOT,
        )
        deadline = time.monotonic() + 60
        while not Path(str(gate) + ".ready").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        spy = subprocess.Popen(
            [
                *("py-spy", "record", "--pid", str(running.process.pid), "--rate", "500"),
                *("--format", "raw", "--output", str(raw), "--nonblocking"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # py-spy attaches
        Path(str(gate) + ".go").touch()
        generator.wait(120)
        spy.send_signal(signal.SIGINT)  # py-spy writes what it has
        spy.wait(30)
    finally:
        running.stop()
    functions: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    lines = raw.read_text().splitlines() if raw.exists() else []  # no py-spy: no samples
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        frames = stack.split(";")
        leaf = frames[-1]
        count = int(count_text)
        total += count
        functions[_short(leaf)] += count
        areas[_area(frames)] += count
    shutil.rmtree(work, ignore_errors=True)

    def share(counter: Counter[str], top: int) -> list[tuple[str, float]]:
        return [(k, round(100 * v / (total or 1), 1)) for k, v in counter.most_common(top)]

    return Profile(total, share(functions, 15), share(areas, 12))


def _short(frame: str) -> str:
    name, _, where = frame.partition(" (")
    path = where.rstrip(")")
    for marker in ("site-packages/", "wt-bench/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path.rsplit(':', 1)[0]})"


def _area(frames: list[str]) -> str:
    """The innermost frame that belongs to a known area."""
    for frame in reversed(frames):
        for marker, area in AREAS:
            if marker in frame:
                return area
    return "other (event loop, interpreter)"


# --- the section -----------------------------------------------------------------------------


@dataclass
class Results:
    compare: list[Row]
    stall: list[Stall]
    idle: list[Idle]
    workers: list[Workers]
    profile: Profile | None
    seconds: float = 0.0


def run(quick: bool = False) -> Results:
    plan = Plan.of(quick)
    started = time.monotonic()
    results = Results(compare(plan), stall(plan), idle(plan), workers(plan), None)
    say("profile")
    results.profile = profile(plan)
    say("fan-out done")
    results.seconds = round(time.monotonic() - started, 1)
    return results


def _ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("nan")


Target = tuple[str, str, float, bool]


def targets(r: Results) -> list[tuple[str, str, str, bool]]:
    """(target, figure, roomcast ÷ baseline, met) for the issue's targets."""
    rows = {row.name: row for row in r.compare}
    rc, bare = rows["roomcast"], rows["bare ASGI"]
    tut, sio = rows["FastAPI tutorial"], rows["python-socketio"]
    stalled = r.stall[0]

    def at_most(target: str, ours: float, theirs: float, unit: str, bound: float) -> Target:
        ratio = _ratio(ours, theirs)
        return (target, f"{ours} vs {theirs} {unit}", ratio, ratio <= bound)

    out: list[Target] = [
        at_most("burst CPU/delivery ≤ 1.1x bare ASGI", rc.cpu_us, bare.cpu_us, "µs", 1.1),
        (
            "burst CPU/delivery < FastAPI tutorial",
            f"{rc.cpu_us} vs {tut.cpu_us} µs",
            _ratio(rc.cpu_us, tut.cpu_us),
            rc.cpu_us < tut.cpu_us,
        ),
        at_most("burst CPU/delivery ≤ 0.2x python-socketio", rc.cpu_us, sio.cpu_us, "µs", 0.2),
        ("burst and paced lose nothing", f"{rc.lost} lost", 0.0, rc.lost == 0),
        at_most(f"paced {RATE}/s p99 ≤ 1.5x bare ASGI", rc.p99_ms, bare.p99_ms, "ms", 1.5),
        at_most(
            "idle memory/connection ≤ 1.15x bare ASGI", rc.idle_kib, bare.idle_kib, "KiB", 1.15
        ),
        at_most(
            "idle memory/connection ≤ 0.75x FastAPI tutorial",
            rc.idle_kib,
            tut.idle_kib,
            "KiB",
            0.75,
        ),
        (
            "one stalled client: others' p99 ≤ 1.2x without it",
            f"{stalled.p99_stalled_ms} vs {stalled.p99_ms} ms",
            stalled.p99_ratio,
            stalled.p99_ratio <= 1.2,
        ),
    ]
    return [(t, f, str(x), ok) for t, f, x, ok in out]


def table(r: Results) -> str:
    rows = {row.name: row for row in r.compare}
    rc, bare = rows["roomcast"], rows["bare ASGI"]
    out = [
        f"N = {N} subscribers in one room, 1 worker. Burst: CPU per delivery and "
        f"deliveries/s (window {WINDOW}); paced: {RATE} chats/s, publish-to-receive latency. "
        "Ratios: this server's figure ÷ roomcast's, and ÷ bare ASGI's "
        "(CPU and memory: lower is better).\n",
        "| server | CPU µs/delivery | vs roomcast | vs bare | deliveries/s | lost "
        "| p50 ms | p99 ms | p99 vs roomcast | max ms | idle KiB/conn | vs roomcast | vs bare "
        "| peak MiB | frame bytes | client µs/delivery |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: | ---: |",
    ]
    for row in r.compare:
        out.append(
            f"| {row.name} | {row.cpu_us} | {_ratio(row.cpu_us, rc.cpu_us)} "
            f"| {_ratio(row.cpu_us, bare.cpu_us)} | {row.deliveries_per_s} | {row.lost} "
            f"| {row.p50_ms} | {row.p99_ms} | {_ratio(row.p99_ms, rc.p99_ms)} | {row.max_ms} "
            f"| {row.idle_kib} | {_ratio(row.idle_kib, rc.idle_kib)} "
            f"| {_ratio(row.idle_kib, bare.idle_kib)} | {row.peak_mib} | {row.frame_bytes} "
            f"| {row.client_cpu_us} |"
        )
    out += [
        "\n### Targets (roomcast ÷ baseline, this run)\n",
        "| target | figures | ratio | met |",
        "| --- | --- | ---: | --- |",
    ]
    for target, figures, ratio, ok in targets(r):
        out.append(f"| {target} | {figures} | {ratio} | {'met' if ok else '**not met**'} |")
    out += [
        f"\n### One stalled client among {N}\n",
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
    for s in r.stall:
        bound = round(STALL_OUTBOX * s.frame_bytes / 1024) if s.name == "roomcast" else "none"
        out.append(
            f"| {s.name} | {s.p99_ms} | {s.p99_stalled_ms} | {s.p99_ratio} | {s.lost} "
            f"| {s.rss_growth_kib} | {s.rss_growth_stalled_kib} | {bound} "
            f"| {s.stalled_frames} frames, {s.stalled_fate} "
            f"| {'' if s.slow_consumers is None else s.slow_consumers} |"
        )
    if r.stall and not r.stall[0].slow_consumers:
        out.append(
            "\nThe stalled client did not reach its outbox within this window (the kernel's "
            "buffers took everything sent to it); a full run sends enough for that."
        )
    out += [
        f"\n### {r.idle[0].connections:,} idle connections\n",
        "MAX_CONNECTIONS=20000 for roomcast. After they joined, 5 chats to all of them.\n",
        "| server | connections | connect + join s | idle KiB/conn | vs bare | peak MiB "
        "| CPU µs/delivery | lost |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    idle_bare = r.idle[-1].idle_kib
    for i in r.idle:
        out.append(
            f"| {i.name} | {i.connections} | {i.connect_s} | {i.idle_kib} "
            f"| {_ratio(i.idle_kib, idle_bare)} | {i.peak_mib} | {i.cpu_us} | {i.lost} |"
        )
    out += [
        "\n### Two workers over Redis\n",
        f"`roomcast serve` with BROADCAST_URL (and so HISTORY_URL) on one Redis, N = {N} "
        "spread over the workers by the kernel; CPU summed over every worker process "
        "(Redis excluded).\n",
        "| setup | CPU µs/delivery | deliveries/s | paced p99 ms | lost |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for w in r.workers:
        out.append(f"| {w.name} | {w.cpu_us} | {w.deliveries_per_s} | {w.p99_ms} | {w.lost} |")
    if r.profile is not None:
        p = r.profile
        out += [
            "\n### Where roomcast's time goes\n",
            f"py-spy, {p.samples} samples of the roomcast server during a burst to {N} "
            "subscribers (samples idle in the event loop left out). By area (the innermost "
            "frame of a known library; time in C code called from it counts to it):\n",
            "| area | % |",
            "| --- | ---: |",
            *(f"| {a} | {s} |" for a, s in p.by_area),
            "\nBy function (self time):\n",
            "| function | % |",
            "| --- | ---: |",
            *(f"| `{f}` | {s} |" for f, s in p.by_function),
        ]
    return "\n".join(out)


def as_json(r: Results) -> dict[str, Any]:
    data = asdict(r)
    return data
