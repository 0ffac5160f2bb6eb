"""SIGTERM (Heroku's shutdown): every WebSocket is closed with 1012 within 5 s, the process exits.

PROTOCOL.md, "Closing": 1012 "the server is shutting down or restarting (within
5 s of SIGTERM)". Heroku sends SIGKILL 30 s after SIGTERM; the process must be
gone well before that.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from ..rawws import RawWebSocket
from ..servers import Server, start_server

CLOSE_WITHIN = 5.0  # the requirement, not a margin
EXIT_WITHIN = 15.0


async def _until_joined(ws: ClientConnection, room: str) -> None:
    deadline = time.monotonic() + 5
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no joined for {room} within 5s"
        message = json.loads(await asyncio.wait_for(ws.recv(), remaining))
        assert message["type"] != "error", message
        if message["type"] == "joined" and message["room"] == room:
            return


async def _drain(ws: ClientConnection) -> float:
    """Read until the connection closes; the monotonic time it closed at."""
    with contextlib.suppress(ConnectionClosed):
        async for _ in ws:
            pass
    return time.monotonic()


def _server_close_code(ws: ClientConnection) -> int | None:
    frame = ws.protocol.close_rcvd
    return None if frame is None else int(frame.code)


async def _wait_exit(server: Server) -> tuple[int, float]:
    """The process's exit status and when it exited; fails after EXIT_WITHIN seconds."""
    try:
        code = await asyncio.to_thread(server.process.wait, EXIT_WITHIN)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"server still running {EXIT_WITHIN}s after SIGTERM:\n{server.log()}"
        ) from None
    return code, time.monotonic()


def _kill(server: Server) -> None:
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait(5)


async def test_sigterm_closes_every_websocket_with_1012_and_exits() -> None:
    server = start_server()
    clients: list[ClientConnection] = []
    try:
        for _ in range(3):
            ws = await asyncio.wait_for(connect(server.ws + "/ws/lobby"), 5)
            clients.append(ws)
            await _until_joined(ws, "lobby")
        drains = [asyncio.create_task(_drain(ws)) for ws in clients]

        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        try:
            closed_at = await asyncio.wait_for(asyncio.gather(*drains), CLOSE_WITHIN)
        except TimeoutError:
            raise AssertionError(
                f"not every WebSocket closed within {CLOSE_WITHIN}s of SIGTERM: "
                f"{[ws.state.name for ws in clients]}\n{server.log()}"
            ) from None
        assert all(t - signalled <= CLOSE_WITHIN for t in closed_at)
        codes = [_server_close_code(ws) for ws in clients]
        assert codes == [1012, 1012, 1012], f"close codes {codes}\n{server.log()}"

        status, exited_at = await _wait_exit(server)
        assert exited_at - signalled <= EXIT_WITHIN
        # Seen with uvicorn 0.54: -15 (uvicorn re-raises the captured SIGTERM after shutdown).
        assert status in (0, -signal.SIGTERM), f"exit status {status}\n{server.log()}"
        assert "Application shutdown complete" in server.log(), server.log()
    finally:
        for ws in clients:
            await ws.close()
        _kill(server)


async def test_sigterm_with_a_busy_client_still_exits() -> None:
    """A client that keeps chatting and reading does not keep the process alive."""
    server = start_server()
    try:
        async with connect(server.ws + "/ws/lobby") as ws:
            await _until_joined(ws, "lobby")
            received: list[dict[str, object]] = []
            sent = 0

            async def chatter() -> None:
                nonlocal sent
                with contextlib.suppress(ConnectionClosed):
                    while True:
                        sent += 1
                        await ws.send(json.dumps({"type": "chat", "text": f"m{sent}"}))
                        await asyncio.sleep(0.1)  # pacing below RATE_LIMIT, not a sync point

            async def reader() -> None:
                with contextlib.suppress(ConnectionClosed):
                    async for frame in ws:
                        received.append(json.loads(frame))

            tasks = [asyncio.create_task(chatter()), asyncio.create_task(reader())]
            # Traffic is really flowing both ways before the signal.
            deadline = time.monotonic() + 5
            while sum(1 for m in received if m["type"] == "ack") < 3:
                assert time.monotonic() < deadline, f"no acks: {received}"
                await asyncio.sleep(0.02)

            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(ws.wait_closed(), CLOSE_WITHIN)
            except TimeoutError:
                raise AssertionError(
                    f"busy WebSocket still open {CLOSE_WITHIN}s after SIGTERM\n{server.log()}"
                ) from None
            assert time.monotonic() - signalled <= CLOSE_WITHIN
            assert _server_close_code(ws) == 1012, server.log()
            await asyncio.wait_for(asyncio.gather(*tasks), 5)

            status, exited_at = await _wait_exit(server)
            assert exited_at - signalled <= EXIT_WITHIN
            assert status in (0, -signal.SIGTERM), f"exit status {status}\n{server.log()}"
    finally:
        _kill(server)


async def test_sigterm_with_a_client_that_stopped_reading_still_exits_in_time() -> None:
    """A client whose TCP window is full cannot take the close frame; it must not hold the
    process past EXIT_WITHIN (Heroku kills at 30 s), nor delay 1012 for everyone else."""
    server = start_server(
        env={
            "RATE_LIMIT": "100000",
            "OUTBOX_SIZE": "900",
            "MAX_TEXT_CHARS": "60000",
            "MAX_MESSAGE_BYTES": "200000",
        }
    )
    stuck = None
    try:
        stuck = RawWebSocket(server.port, "/ws/lobby", rcvbuf=4096)
        assert stuck.status_line.startswith("HTTP/1.1 101"), stuck.status_line
        async with connect(server.ws + "/ws/lobby", max_size=None) as ws:
            await _until_joined(ws, "lobby")
            # 400 x 50 kB = 20 MB for the stuck client: far beyond loopback socket buffers,
            # below its outbox (900), so it is stuck rather than closed with 4408.
            text = "x" * 50_000
            for i in range(400):
                await ws.send(json.dumps({"type": "chat", "text": text, "ref": f"r{i}"}))
            acks = 0
            deadline = time.monotonic() + 20
            while acks < 400:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"{acks} acks of 400"
                message = json.loads(await asyncio.wait_for(ws.recv(), remaining))
                assert message["type"] != "error", message
                acks += message["type"] == "ack"
            drain = asyncio.create_task(_drain(ws))

            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(drain, CLOSE_WITHIN)
            except TimeoutError:
                raise AssertionError(
                    f"reading client still open {CLOSE_WITHIN}s after SIGTERM\n{server.log()}"
                ) from None
            assert _server_close_code(ws) == 1012, server.log()

            status, exited_at = await _wait_exit(server)
            assert exited_at - signalled <= EXIT_WITHIN
            assert status in (0, -signal.SIGTERM), f"exit status {status}\n{server.log()}"
    finally:
        if stuck is not None:
            stuck.close()
        _kill(server)
