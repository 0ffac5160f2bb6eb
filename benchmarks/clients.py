"""The load generator's clients: picows subscribers and publishers, and an HTTP publisher.

A subscriber takes the send time of any text frame holding `@<phase><ns>@`
and counts it towards the current phase. Browser-like subscribers
(`deflate=True`) offer permessage-deflate in the handshake exactly as
Chrome and Firefox do (`permessage-deflate; client_max_window_bits`) and
inflate every compressed message they receive. Where the server keeps its
context (uvicorn's own per-connection deflate) each connection has its own
inflater, as a browser does. Where the server answers
`server_no_context_takeover` (WS_COMPRESSION=shared), a message is a
function of its bytes alone, so the process inflates each distinct message
once, with a fresh inflater (which also proves it stands alone), and every
subscriber that receives those same bytes reads the same text. A thousand
browsers inflate on a thousand CPUs; one process inflating a thousand
copies would set the server's pace instead of measuring it. They send
uncompressed (RFC 7692 lets a sender choose per message): the publisher's
chats are a few bytes. Bytes on the wire are the kernel's count
of TCP payload bytes received on each subscriber's socket
(`tcpi_bytes_received` of TCP_INFO): frame headers and all, no guessing.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
import zlib
from collections import Counter
from typing import Any

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

BUCKET_NS = 10_000  # latencies are counted in buckets of 10 µs
INFLATED_KEPT = 4096  # distinct messages kept inflated (a burst window is 32)
# What Chrome and Firefox offer (RFC 7692).
BROWSER_OFFER = "permessage-deflate; client_max_window_bits"
_TAIL = b"\x00\x00\xff\xff"
_TCP_INFO_LEN = 232
_BYTES_RECEIVED_AT = 128  # struct tcp_info: tcpi_bytes_received (Linux 4.1+)


class Run:
    """Shared counters of the current phase; the callbacks touch only these."""

    def __init__(self, subscribers: int) -> None:
        self.subscribers = subscribers
        self.active = subscribers
        self.phase = b"0"
        self.received = 0
        self.frame_bytes = 0
        self.latencies: Counter[int] = Counter()  # 10 µs buckets
        self.synced: set[int] = set()
        # Messages sent without context takeover, inflated once for every subscriber.
        self.inflated: dict[bytes, bytes] = {}
        self.on_progress: Any = None  # the burst publisher's callback
        self.pids: list[int] = []

    def reset(self, phase: bytes) -> None:
        self.phase = phase
        self.received = 0
        self.frame_bytes = 0
        self.latencies = Counter()


class Subscriber(WSListener):
    def __init__(self, run: Run, number: int, socketio: bool, stalled: bool = False) -> None:
        self.run = run
        self.number = number
        self.socketio = socketio
        self.stalled = stalled
        self.transport: WSTransport | None = None
        self.ready = asyncio.get_running_loop().create_future()
        self.frames = 0
        self.close_code: int | None = None
        self.deflate = False  # negotiated permessage-deflate
        self.standalone = False  # ... with server_no_context_takeover
        self._inflater: Any = None
        if not socketio:
            self.ready.set_result(None)

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def inflate(self, payload: bytes) -> bytes:
        if self.standalone:
            inflated = self.run.inflated
            text = inflated.get(payload)
            if text is None:
                if len(inflated) >= INFLATED_KEPT:
                    inflated.clear()
                text = inflated[payload] = zlib.decompressobj(wbits=-15).decompress(payload + _TAIL)
            return text
        if self._inflater is None:
            self._inflater = zlib.decompressobj(wbits=-15)
        return self._inflater.decompress(payload + _TAIL)  # type: ignore[no-any-return]

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.TEXT:
            payload = frame.get_payload_as_bytes()
            if frame.rsv1:
                payload = self.inflate(payload)
            self.frames += 1
            at = payload.find(b"@")
            run = self.run
            if at >= 0:
                if self.stalled or payload[at + 1 : at + 2] != run.phase:
                    return
                end = payload.find(b"@", at + 2)
                run.latencies[(time.monotonic_ns() - int(payload[at + 2 : end])) // BUCKET_NS] += 1
                run.received += 1
                run.frame_bytes += len(payload)
                if run.on_progress is not None:
                    run.on_progress()
            elif payload.find(b"#sync") >= 0:
                run.synced.add(self.number)
            elif self.socketio:
                self._engineio(transport, payload)
        elif kind == WSMsgType.CLOSE:
            self.close_code = frame.get_close_code().value
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

    def bytes_received(self) -> int:
        """TCP payload bytes the kernel received on this socket so far."""
        if self.transport is None or self.transport.is_disconnected:
            return 0
        sock = self.transport.underlying_transport.get_extra_info("socket")
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
        return int(struct.unpack_from("Q", info, _BYTES_RECEIVED_AT)[0])


class Publisher(Subscriber):
    def __init__(self, run: Run, socketio: bool, pad: int) -> None:
        super().__init__(run, -1, socketio)
        self.pad = b"x" * pad

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT and not frame.rsv1:
            payload = frame.get_payload_as_bytes()
            if self.socketio and payload.find(b"@") < 0 and payload.find(b"#sync") < 0:
                self._engineio(transport, payload)

    def publish(self, text: bytes) -> None:
        assert self.transport is not None
        if self.socketio:
            text = b'42["msg","' + text + b'"]'
        self.transport.send(WSMsgType.TEXT, text)

    def marker(self) -> bytes:
        return b"@" + self.run.phase + str(time.monotonic_ns()).encode() + b"@"

    def chat(self) -> None:
        self.publish(self.marker() + self.pad)


# A room notification of about 1 KiB as a service would send one: a sentence or two
# of text, and structured data. Nothing in it repeats for the sake of deflate.
NOTIFICATION_TEXT = (
    "Deployment 2481 of checkout-api finished on eu-west-1 in 6 min 12 s. Three services "
    "were restarted (checkout-api, pricing-worker and the webhook relay); the database "
    "migration 0193_add_refund_reason ran in 840 ms. Error rate over the first five "
    "minutes: 0.02%, p95 latency 182 ms against 176 ms before. Rollback stays available "
    "from the release page until tomorrow 09:00 UTC."
)
NOTIFICATION_DATA = {
    "deployment": 2481,
    "service": "checkout-api",
    "region": "eu-west-1",
    "commit": "9f3c2e71b0d4a85e6c1f27d9a0b3e4c5d6f7a8b9",
    "author": {"id": "u-30418", "name": "Priya Raman"},
    "url": "https://deploy.example.com/releases/2481?tab=summary",
    "duration_s": 372.4,
    "checks": {"passed": 1843, "failed": 0, "skipped": 17},
    "changes": [
        "Refund reasons are stored with each refund",
        "Retry webhook deliveries with jitter",
        "Cache tax rates per region for 10 minutes",
    ],
}
_MARK = b"\x00MARK\x00"


class HttpPublisher(asyncio.Protocol):
    """Room notifications through the HTTP API, pipelined on one keep-alive connection."""

    def __init__(self, run: Run, host: str, port: int, room: str, key: str) -> None:
        self.run = run
        body = json.dumps(
            {
                "type": "notification",
                "title": "checkout-api deployed",
                "body": "MARK " + NOTIFICATION_TEXT,
                "level": "success",
                "data": NOTIFICATION_DATA,
            }
        ).encode()
        self._body = body.replace(b"MARK", _MARK)
        self._head = (
            f"POST /api/rooms/{room}/publish HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            "Content-Length: "
        ).encode()
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self.sent = 0
        self.answered = 0
        self.failures: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def notify(self) -> None:
        assert self.transport is not None
        marker = b"@" + self.run.phase + str(time.monotonic_ns()).encode() + b"@"
        body = self._body.replace(_MARK, marker)
        self.transport.write(self._head + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.sent += 1

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(buffer) < end + 4 + length:
                return
            status = int(head[9:12])
            if status != 200 and len(self.failures) < 5:
                self.failures.append(f"{status} {bytes(buffer[end + 4 : end + 4 + length])!r}")
            del buffer[: end + 4 + length]
            self.answered += 1


async def http_publisher(run: Run, url: str, room: str, key: str) -> HttpPublisher:
    host, _, port = url.removeprefix("ws://").partition(":")
    loop = asyncio.get_running_loop()
    _, publisher = await loop.create_connection(
        lambda: HttpPublisher(run, host, int(port), room, key), host, int(port)
    )
    return publisher


def _small_buffer_socket(url: Any) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that stops reading
    sock.connect((url.host, url.port))
    sock.setblocking(False)
    return sock


async def connect(
    url: str,
    listener: Subscriber,
    *,
    small_buffer: bool = False,
    deflate: bool = False,
    bind: str | None = None,
) -> Subscriber:
    kwargs: dict[str, Any] = {"max_frame_size": 1 << 24}
    if small_buffer:
        kwargs["socket_factory"] = _small_buffer_socket
    if deflate:
        kwargs["extra_headers"] = {"Sec-WebSocket-Extensions": BROWSER_OFFER}
    if bind is not None:
        kwargs["local_addr"] = (bind, 0)
    transport, _ = await ws_connect(lambda: listener, url, **kwargs)
    accepted = transport.response.headers.get("Sec-WebSocket-Extensions") or ""
    listener.deflate = "permessage-deflate" in accepted
    listener.standalone = listener.deflate and "server_no_context_takeover" in accepted
    await asyncio.wait_for(listener.ready, 30)
    return listener


def percentiles(latencies: Counter[int]) -> dict[str, float]:
    """p50, p99 and max in ms from 10 µs buckets (a bucket's upper edge)."""
    total = sum(latencies.values())
    out = {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    if not total:
        return out
    seen = 0
    wanted = [("p50_ms", total * 0.50), ("p99_ms", total * 0.99)]
    for bucket in sorted(latencies):
        seen += latencies[bucket]
        while wanted and seen >= wanted[0][1]:
            out[wanted.pop(0)[0]] = round((bucket + 1) * BUCKET_NS / 1e6, 2)
    out["max_ms"] = round((max(latencies) + 1) * BUCKET_NS / 1e6, 2)
    return out


CONNECT_BATCH = 100  # connections opened at once


async def connect_all(
    run: Run,
    url: str,
    numbers: range,
    *,
    socketio: bool = False,
    deflate: bool = False,
    bind: list[str] | None = None,
    small_buffer: int | None = None,
) -> list[Subscriber]:
    """Subscribers `numbers` (`{i}` in `url` is the number), CONNECT_BATCH at a time, each
    from the next of the `bind` source addresses; number `small_buffer` with a 4 KiB
    receive buffer (the one that will stop reading)."""
    subs: list[Subscriber] = []
    for first in range(numbers.start, numbers.stop, CONNECT_BATCH):
        batch = [
            connect(
                url.replace("{i}", str(i)),
                Subscriber(run, i, socketio),
                small_buffer=i == small_buffer,
                deflate=deflate,
                bind=bind[i % len(bind)] if bind else None,
            )
            for i in range(first, min(numbers.stop, first + CONNECT_BATCH))
        ]
        subs += await asyncio.gather(*batch)
    return subs
