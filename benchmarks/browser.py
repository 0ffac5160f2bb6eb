"""Browser-like clients: permessage-deflate under each WS_COMPRESSION setting.

Every browser offers permessage-deflate, and the `websockets` client does
too; picows does not. Here the load generator's subscribers offer it as
Chrome does (`permessage-deflate; client_max_window_bits`) and inflate
every compressed message as a browser must (`benchmarks/clients.py`), still
on picows in one process: the client side stays cheap enough to measure
the server. N of them join one room of roomcast under WS_COMPRESSION=off
(deflate refused), `shared` (negotiated without context takeover: a
broadcast compressed once for every member) and `per-connection` (uvicorn's
own: a compressor per connection); the same N plain clients (no offer)
under `shared` are the reference.

Each run has three phases. A burst of chats (~185-byte envelopes, at most
WINDOW per member in flight) gives throughput. A burst goes as fast as the
load generator reads, and the fewer frames the server finds queued per
connection in a turn, the more system calls it makes per delivery: so the
browser-like subscribers inflate each distinct message sent without
context takeover once for the whole process (`benchmarks/clients.py` says
why that reads exactly what each browser would), and keep their pace close
to the plain subscribers'. The CPU comparison is also made at the same
offered load for every case: chats paced at PACED_RATE per second, and
~1 KiB room notifications (a deployment summary: a few sentences and
structured data) published through the HTTP API at NOTE_RATE per second.

Bytes on the wire are counted by the kernel: the TCP payload bytes each
subscriber's socket received during a phase (`tcpi_bytes_received` of
TCP_INFO), over the frames delivered; frame bytes are the text after
inflating. CPU and idle memory as in the fan-out section. Writes: the
server's `roomcast_writes_total` by path (fast: prepared frames straight to
the transport, one write per connection per turn; asgi: one ASGI `send` per
frame) over the whole run.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from .harness import measure, ratio, say
from .servers import ROOMCAST

N = 1000
WINDOW = 32
PACED_RATE = 50
NOTE_RATE = 20
API_KEY = "bench-api-key-0123456789"


@dataclass(frozen=True)
class Case:
    clients: str  # "plain" or "browser-like"
    compression: str

    @property
    def name(self) -> str:
        return f"{self.clients}, WS_COMPRESSION={self.compression}"


PLAIN_SHARED = Case("plain", "shared")
BROWSER_SHARED = Case("browser-like", "shared")
CASES = [
    Case("plain", "off"),
    PLAIN_SHARED,
    Case("browser-like", "off"),
    BROWSER_SHARED,
    Case("browser-like", "per-connection"),
]
QUICK_CASES = [PLAIN_SHARED, BROWSER_SHARED, Case("browser-like", "per-connection")]


@dataclass
class Row:
    name: str
    clients: str
    compression: str
    deflated: int  # subscribers that negotiated permessage-deflate
    burst_cpu_us: float  # chats
    burst_per_s: int
    client_cpu_us: float  # the load generator's own CPU per delivery in the burst
    chat_cpu_us: float  # paced chats
    chat_p99_ms: float
    chat_frame_bytes: int
    chat_wire_bytes: int
    note_cpu_us: float  # paced notifications
    note_p99_ms: float
    note_frame_bytes: int
    note_wire_bytes: int
    lost: int
    idle_kib: float
    fast_writes: int
    asgi_writes: int
    rounds: list[dict[str, Any]] = field(default_factory=list, repr=False)


@dataclass
class Results:
    rows: list[Row]

    def row(self, case: Case) -> Row | None:
        return next((r for r in self.rows if r.name == case.name), None)


def run(quick: bool = False) -> Results:
    cases = QUICK_CASES if quick else CASES
    rounds, burst, seconds, settle = (1, 40, 1, 0.3) if quick else (3, 150, 3, 1.0)
    phases = [
        {"mode": "burst", "messages": burst, "window": WINDOW},
        {"mode": "paced", "messages": seconds * PACED_RATE, "rate": PACED_RATE},
        {
            "mode": "paced",
            "messages": seconds * NOTE_RATE,
            "rate": NOTE_RATE,
            "kind": "notification",
        },
    ]
    reports: dict[Case, list[dict[str, Any]]] = {c: [] for c in cases}
    for round_ in range(rounds):
        shift = round_ * 2 % len(cases)
        for case in cases[shift:] + cases[:shift]:
            say(f"browser-like round {round_ + 1}: {case.name}")
            plan = {
                "subscribers": N,
                "settle": settle,
                "deflate": case.clients == "browser-like",
                "api": {"room": "bench", "key": API_KEY},
                "phases": phases,
            }
            env = {"WS_COMPRESSION": case.compression, "API_KEY": API_KEY}
            reports[case].append(measure(ROOMCAST, plan, env))
    return Results([_row(case, r) for case, r in reports.items()])


def _row(case: Case, reports: list[dict[str, Any]]) -> Row:
    def med(phase: int, key: str) -> float:
        values: list[float] = [r["phases"][phase][key] for r in reports]
        return round(statistics.median(values), 2)

    return Row(
        name=case.name,
        clients=case.clients,
        compression=case.compression,
        deflated=min(r["deflated"] for r in reports),
        burst_cpu_us=med(0, "cpu_us_per_delivery"),
        burst_per_s=round(med(0, "deliveries_per_s")),
        client_cpu_us=med(0, "client_cpu_us_per_delivery"),
        chat_cpu_us=med(1, "cpu_us_per_delivery"),
        chat_p99_ms=med(1, "p99_ms"),
        chat_frame_bytes=round(med(1, "frame_bytes")),
        chat_wire_bytes=round(med(1, "wire_bytes")),
        note_cpu_us=med(2, "cpu_us_per_delivery"),
        note_p99_ms=med(2, "p99_ms"),
        note_frame_bytes=round(med(2, "frame_bytes")),
        note_wire_bytes=round(med(2, "wire_bytes")),
        lost=sum(p["lost"] for r in reports for p in r["phases"]),
        idle_kib=round(statistics.median(r["idle_kib_per_connection"] for r in reports), 1),
        fast_writes=round(statistics.median(r["writes"].get("fast", 0) for r in reports)),
        asgi_writes=round(statistics.median(r["writes"].get("asgi", 0) for r in reports)),
        rounds=reports,
    )


def table(r: Results) -> str:
    ref = r.row(PLAIN_SHARED)
    out = [
        f"N = {N} subscribers in one room, 1 worker. Burst: chats, window {WINDOW}; "
        f"paced: chats at {PACED_RATE}/s, then 1 KiB notifications through the HTTP API at "
        f"{NOTE_RATE}/s. Ratios ÷ plain clients under WS_COMPRESSION=shared.\n",
        "| clients, setting | deflate negotiated | burst CPU µs/delivery | vs plain "
        "| burst deliveries/s | client µs/delivery | paced chat CPU µs/delivery | vs plain "
        "| chat p99 ms | chat frame bytes | chat wire bytes | vs plain "
        "| notification CPU µs/delivery | vs plain | notification p99 ms "
        "| notification frame bytes | notification wire bytes | vs plain | lost "
        "| idle KiB/conn | vs plain | fast writes | ASGI writes |",
        "|" + " --- |" + " ---: |" * 22,
    ]
    for row in r.rows:

        def vs(key: str, row: Row = row) -> float:
            return ratio(getattr(row, key), getattr(ref, key)) if ref else float("nan")

        out.append(
            f"| {row.name} | {row.deflated} | {row.burst_cpu_us} | {vs('burst_cpu_us')} "
            f"| {row.burst_per_s} | {row.client_cpu_us} | {row.chat_cpu_us} "
            f"| {vs('chat_cpu_us')} | {row.chat_p99_ms} | {row.chat_frame_bytes} "
            f"| {row.chat_wire_bytes} | {vs('chat_wire_bytes')} | {row.note_cpu_us} "
            f"| {vs('note_cpu_us')} | {row.note_p99_ms} | {row.note_frame_bytes} "
            f"| {row.note_wire_bytes} | {vs('note_wire_bytes')} | {row.lost} | {row.idle_kib} "
            f"| {vs('idle_kib')} | {row.fast_writes} | {row.asgi_writes} |"
        )
    return "\n".join(out)


def as_json(r: Results) -> dict[str, Any]:
    return asdict(r)
