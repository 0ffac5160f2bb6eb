"""`GET /metrics`: Prometheus text that counts exactly what happened, on one worker or several."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import importlib
import os
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed

from roomcast.protocol.codes import ErrorCode

from ..brokers import start_redis
from ..servers import Server, start_server
from ..support import TIMEOUT, Client, client, room_client
from .test_slow_consumer import read_frame, stalled_socket

ROOM = "metered"
REQUEST_TYPES = {"join", "leave", "chat", "presence", "refresh", "ping", "other"}
COUNTERS = {
    "roomcast_joins": (),
    "roomcast_messages_in": ("type",),
    "roomcast_messages_published": (),
    "roomcast_deliveries": (),
    "roomcast_slow_consumers": (),
    "roomcast_rate_limited": (),
    "roomcast_errors": ("code",),
    "roomcast_broker_reconnects": (),
    "roomcast_writes": ("path",),
    "roomcast_refused_connections": ("reason",),
}
GAUGES = (
    "roomcast_connections",
    "roomcast_rooms",
    "roomcast_users",
    "roomcast_subscriptions",
    "roomcast_tasks",
    "roomcast_history_memory_bytes",
)
REFUSALS = {
    "max_connections",
    "connect_rate",
    "origin",
    "unauthorized",
    "forbidden",
    "invalid_room",
    "other",
    "handshake_timeout",
    "handshake_cap",
}

Labels = tuple[tuple[str, str], ...]


class Scrape:
    """One /metrics answer, parsed: sample values by name and labels."""

    def __init__(self, content_type: str, text: str) -> None:
        self.content_type = content_type
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: dict[tuple[str, Labels], float] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        assert key in self.samples, f"no sample {key} in:\n{self.text}"
        return self.samples[key]

    def labelled(self, name: str, label: str) -> dict[str, float]:
        return {
            dict(labels)[label]: value
            for (sample, labels), value in self.samples.items()
            if sample == name
        }

    def totals(self) -> dict[str, float]:
        """Every roomcast counter's samples: `name{label}` -> value."""
        found: dict[str, float] = {}
        for (sample, labels), value in self.samples.items():
            if sample.startswith("roomcast_") and sample.endswith("_total"):
                found[sample + "".join(f"{{{v}}}" for _, v in labels)] = value
        return found


def fetch(server: Server, accept: str | None = None) -> Scrape:
    request = urllib.request.Request(server.http + "/metrics")
    if accept is not None:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        assert response.status == 200
        return Scrape(response.headers["Content-Type"], response.read().decode())


async def scrape(server: Server) -> Scrape:
    return await asyncio.wait_for(asyncio.to_thread(fetch, server), TIMEOUT + 1)


async def scrape_until(server: Server, within: float = 10.0, **expected: float) -> Scrape:
    """Poll /metrics until every named sample has its expected value."""
    deadline = time.monotonic() + within
    while True:
        found = await scrape(server)
        if all(found(name) == value for name, value in expected.items()):
            return found
        if time.monotonic() > deadline:
            got = {name: found(name) for name in expected}
            raise AssertionError(f"/metrics never reached {expected}: last {got}")
        await asyncio.sleep(0.05)  # polling interval, bounded by the deadline


def expect_counters(found: Scrape, **nonzero: float) -> None:
    """Every roomcast counter is 0 except the given ones (`name{label}` as `name__label`).
    Writes are left out: how many frames one write carries depends on timing."""
    totals = {k: v for k, v in found.totals().items() if not k.startswith("roomcast_writes")}
    want = {name: 0.0 for name in totals}
    for key, value in nonzero.items():
        name, _, label = key.partition("__")
        want[f"roomcast_{name}_total" + (f"{{{label}}}" if label else "")] = value
    assert totals == want


@pytest.fixture
def fresh() -> Iterator[Server]:
    srv = start_server()
    yield srv
    srv.terminate()


@contextlib.asynccontextmanager
async def members(server: Server, count: int, room: str = ROOM) -> AsyncIterator[list[Client]]:
    """`count` clients that joined `room` with `join`, one after another; each
    earlier member has read the `system` join of every later one."""
    async with contextlib.AsyncExitStack() as stack:
        joined: list[Client] = []
        for index in range(count):
            member = await stack.enter_async_context(client(server))
            await member.join(room)
            for earlier in joined:
                await earlier.recv_type("system", event="join", user=member.user, online=index + 1)
            joined.append(member)
        yield joined


# --- one worker ------------------------------------------------------------------


def test_metrics_is_prometheus_text_with_every_roomcast_metric(fresh: Server) -> None:
    found = fetch(fresh)
    assert found.content_type.startswith("text/plain; version=0.0.4"), found.content_type
    for name, labels in COUNTERS.items():
        assert found.types[name] == "counter", name
        if not labels:
            assert found(name + "_total") == 0
    for name in GAUGES:
        assert found.types[name] == "gauge"
        assert found(name) == 0
    assert found.types["roomcast_fanout_seconds"] == "histogram"
    assert found("roomcast_fanout_seconds_count") == 0
    # Label values come from fixed sets, each present from the start.
    assert set(found.labelled("roomcast_messages_in_total", "type")) == REQUEST_TYPES
    assert set(found.labelled("roomcast_errors_total", "code")) == {
        code.value for code in ErrorCode
    }
    assert set(found.labelled("roomcast_refused_connections_total", "reason")) == REFUSALS
    buckets = found.labelled("roomcast_fanout_seconds_bucket", "le")
    assert "1e-05" in buckets and "0.1" in buckets and "+Inf" in buckets
    # A scraper that asks for OpenMetrics gets it.
    open_metrics = fetch(fresh, accept="application/openmetrics-text; version=1.0.0")
    assert open_metrics.content_type.startswith("application/openmetrics-text")
    assert open_metrics.text.endswith("# EOF\n")


async def test_counters_count_known_traffic_exactly(fresh: Server) -> None:
    async with members(fresh, 3) as (ann, bob, cat):
        for sender in (ann, bob, cat):
            for n in range(2):
                text = f"{sender.user['id']}:{n}"
                await sender.chat(text, room=ROOM)
                for other in (ann, bob, cat):
                    if other is not sender:
                        await other.recv_type("chat", text=text)
        await ann.send({"type": "presence", "room": ROOM, "ref": "p"})
        await ann.recv_type("presence", ref="p", online=3)
        await ann.ping()
        await bob.send({"type": "chat", "room": "elsewhere", "text": "hi", "ref": "x"})
        await bob.recv_type("error", code="not_joined", ref="x")
        await bob.send("{not json")
        await bob.recv_type("error", code="invalid_json")
        await cat.send(b"\x00binary")
        await cat.recv_type("error", code="unsupported_frame")

        found = await scrape(fresh)
        assert found("roomcast_connections") == 3
        assert found("roomcast_rooms") == 1
        expect_counters(
            found,
            joins=3,
            messages_in__join=3,
            messages_in__chat=7,
            messages_in__presence=1,
            messages_in__ping=1,
            messages_in__other=2,
            messages_published=6,
            # system joins to the 0, 1 and 2 earlier members, and 6 chats to 3 members
            deliveries=0 + 1 + 2 + 6 * 3,
            errors__not_joined=1,
            errors__invalid_json=1,
            errors__unsupported_frame=1,
        )
        # Each welcome goes through ASGI send; every later frame straight to the transport,
        # fewer writes than frames where one loop turn queued several for a connection.
        assert found.totals()["roomcast_writes_total{asgi}"] == 3
        frames_after_welcome = 3 + 21 + 6 + 1 + 1 + 3  # joined, deliveries, acks, presence,
        # pong, errors
        assert 0 < found.totals()["roomcast_writes_total{fast}"] <= frames_after_welcome
        # One fan-out per frame of the room: 3 system joins and 6 chats.
        assert found("roomcast_fanout_seconds_count") == 3 + 6
        assert found("roomcast_fanout_seconds_bucket", le="+Inf") == 3 + 6
        assert 0 < found("roomcast_fanout_seconds_sum") < 9 * 0.1

        await cat.send({"type": "leave", "room": ROOM, "ref": "l"})
        await cat.recv_type("left", room=ROOM, ref="l")
        for member in (ann, bob):
            await member.recv_type("system", event="leave", user=cat.user, online=2)
        found = await scrape(fresh)
        assert found("roomcast_messages_in_total", type="leave") == 1
        assert found("roomcast_deliveries_total") == 21 + 2
        assert found("roomcast_joins_total") == 3
        assert found("roomcast_rooms") == 1
    await scrape_until(fresh, roomcast_connections=0, roomcast_rooms=0)


async def test_rate_limited_frames_are_counted() -> None:
    server = start_server({"RATE_LIMIT": "2"})  # a burst of 4, then 2 per second
    try:
        async with client(server) as conn:
            for n in range(7):
                await conn.send({"type": "ping", "ref": f"p{n}"})
            answers = await conn.recv_many(7)
            limited = [a for a in answers if a["type"] == "error"]
            assert all(a["code"] == "rate_limited" for a in limited), answers
            assert len(limited) >= 2, answers
            found = await scrape(server)
            expect_counters(
                found,
                rate_limited=len(limited),
                errors__rate_limited=len(limited),
                messages_in__ping=7 - len(limited),
            )
        await scrape_until(server, roomcast_connections=0)
    finally:
        server.terminate()


async def test_a_slow_consumer_closed_with_4408_is_counted() -> None:
    text_chars = 60_000
    server = start_server(
        {
            "OUTBOX_SIZE": "4",
            "MAX_TEXT_CHARS": str(text_chars),
            "MAX_MESSAGE_BYTES": str(text_chars + 1000),
            "RATE_LIMIT": "100000",
        }
    )
    stalled = stalled_socket(server, f"/ws/{ROOM}")
    try:
        await scrape_until(server, roomcast_connections=1, roomcast_rooms=1)
        async with room_client(server, ROOM) as publisher:
            # Far more than the kernel and uvicorn buffer for one socket that never reads.
            for sent in range(1, 301):
                await publisher.chat("x" * text_chars, room=ROOM)
                if sent % 10 == 0 and (await scrape(server))("roomcast_slow_consumers_total"):
                    break
            found = await scrape(server)
            assert found("roomcast_slow_consumers_total") == 1, f"not closed after {sent}"
            expect_counters(
                found,
                joins=2,
                messages_in__chat=sent,
                messages_published=sent,
                slow_consumers=1,
                # the publisher's join to the stalled one, and every chat to both: the
                # stalled one stays a member until its socket is gone
                deliveries=1 + 2 * sent,
            )
            # It reads again: what was queued, then the close frame with 4408.
            stalled.settimeout(TIMEOUT)
            async with asyncio.timeout(30):
                while (frame := await asyncio.to_thread(read_frame, stalled))[0] != 0x8:
                    pass
            assert int.from_bytes(frame[1][:2], "big") == 4408
            stalled.close()
            await scrape_until(server, roomcast_connections=1, roomcast_slow_consumers_total=1)
        await scrape_until(server, roomcast_connections=0, roomcast_rooms=0)
    finally:
        stalled.close()
        server.terminate()


async def test_broker_reconnects_are_counted() -> None:
    redis = start_redis()
    server = start_server({"BROADCAST_URL": redis.url})
    try:
        redis.stop(keep_data=True)
        await wait_ready(server, False)
        redis = start_redis(restart=redis)
        await wait_ready(server, True)
        found = await scrape(server)
        expect_counters(found, broker_reconnects=1)
    finally:
        server.terminate()
        redis.stop()


def readyz(server: Server) -> int:
    try:
        with urllib.request.urlopen(server.http + "/readyz", timeout=TIMEOUT) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


async def wait_ready(server: Server, ready: bool, within: float = 20.0) -> None:
    async with asyncio.timeout(within):
        while (await asyncio.to_thread(readyz, server) == 200) != ready:
            await asyncio.sleep(0.05)  # polling /readyz, bounded by the timeout


def test_importing_the_metrics_again_keeps_the_same_metrics() -> None:
    import roomcast.observe.metrics

    before = (
        roomcast.observe.metrics.CONNECTIONS,
        roomcast.observe.metrics.ERRORS,
        roomcast.observe.metrics.FANOUT_SECONDS,
    )
    again = importlib.reload(roomcast.observe.metrics)
    assert before == (again.CONNECTIONS, again.ERRORS, again.FANOUT_SECONDS)


# --- several workers ---------------------------------------------------------------


def shared_env(redis_url: str, **extra: str) -> dict[str, str]:
    return {
        "BROADCAST_URL": f"{redis_url}?prefix=m{uuid.uuid4().hex[:12]}",
        "WEB_CONCURRENCY": "2",
        "RATE_LIMIT": "5000",
        **extra,
    }


async def workers_started(server: Server, count: int, within: float = 20.0) -> None:
    async with asyncio.timeout(within):
        while server.log().count("Application startup complete") < count:
            await asyncio.sleep(0.05)  # reading the server's log, bounded by the timeout


def worker_view(server: Server) -> Scrape:
    """/metrics as one of the workers answers it."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        return Scrape(response.headers["Content-Type"], response.read().decode())
    finally:
        conn.close()


async def views(server: Server, count: int) -> list[Scrape]:
    return [
        await asyncio.wait_for(asyncio.to_thread(worker_view, server), TIMEOUT + 1)
        for _ in range(count)
    ]


def established(pid: int, port: int) -> int:
    """TCP connections to `port` that the process `pid` holds (from /proc, not asking it)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for row in Path(table).read_text().splitlines()[1:]:
                fields = row.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "01":  # ESTABLISHED
                    inodes.add(fields[9])
    held = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            link = os.readlink(fd)
            held += link.startswith("socket:[") and link[8:-1] in inodes
    return held


async def test_several_workers_report_every_connection_and_summed_counters(
    redis_url: str,
) -> None:
    server = start_server(shared_env(redis_url))
    try:
        await workers_started(server, 2)
        async with members(server, 10) as joined:
            await joined[0].chat("to every worker", room=ROOM)
            for member in joined[1:]:
                await member.recv_type("chat", text="to every worker")
            await joined[-1].send({"type": "chat", "room": "elsewhere", "text": "x", "ref": "x"})
            await joined[-1].recv_type("error", code="not_joined", ref="x")
            # Each worker holds some of the ten (as the kernel handed them out), and
            # whichever answers counts all of them, and the room once per worker.
            local = [established(pid, server.port) for pid in worker_pids(server)]
            assert sorted(local) != [0, 10] and sum(local) == 10, local
            for found in await views(server, 6):
                assert found("roomcast_connections") == 10, local
                assert found("roomcast_users") == 10
                assert found("roomcast_rooms") == 2
                expect_counters(
                    found,
                    joins=10,
                    messages_in__join=10,
                    messages_in__chat=2,
                    messages_published=1,
                    # system joins to the 0..9 earlier members, one chat to 10
                    deliveries=sum(range(10)) + 10,
                    errors__not_joined=1,
                )
        await scrape_until(server, roomcast_connections=0, roomcast_rooms=0)
        for found in await views(server, 4):
            assert found("roomcast_connections") == 0
    finally:
        server.terminate()


def worker_pids(server: Server) -> list[int]:
    """The worker processes uvicorn spawned under the server's parent process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        parent = int(stat.rpartition(")")[2].split()[1])
        if parent == server.process.pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def sockets_of(pid: int) -> int:
    fds = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fds.iterdir() if os.readlink(fd).startswith("socket:"))


async def answers(conn: Client) -> bool:
    try:
        await conn.ping()
    except ConnectionClosed:
        return False
    return True


async def test_a_killed_workers_connections_leave_the_count(redis_url: str) -> None:
    server = start_server(shared_env(redis_url))
    try:
        await workers_started(server, 2)
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(client(server)) for _ in range(10)]
            await scrape_until(server, roomcast_connections=10)
            workers = worker_pids(server)
            assert len(workers) == 2, workers
            # The one holding more of the ten dies without any clean-up; uvicorn starts another.
            os.kill(max(workers, key=sockets_of), signal.SIGKILL)
            alive = [conn for conn in clients if await answers(conn)]
            assert len(alive) < 10
            await scrape_until(server, roomcast_connections=len(alive))
            for found in await views(server, 4):
                assert found("roomcast_connections") == len(alive)
    finally:
        server.terminate()


def db_files(folder: Path) -> set[str]:
    return {path.name for path in folder.glob("*.db")}


async def test_a_chosen_multiproc_dir_is_used_and_cleared_of_earlier_runs(
    redis_url: str, tmp_path: Path
) -> None:
    env = shared_env(redis_url, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    first = start_server(env)
    try:
        await workers_started(first, 2)
        async with members(first, 2):
            await scrape_until(first, roomcast_joins_total=2, roomcast_connections=2)
    finally:
        first.terminate()
    earlier = db_files(tmp_path)
    assert any(name.startswith("counter_") for name in earlier), earlier
    second = start_server(env)
    try:
        await workers_started(second, 2)
        expect_counters(await scrape(second))
        assert not earlier & db_files(tmp_path)
    finally:
        second.terminate()
