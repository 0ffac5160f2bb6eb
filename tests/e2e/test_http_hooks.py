"""`roomcast serve` with HTTP hooks from the environment, against a real hook backend."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from roomcast.client import Client, Forbidden
from roomcast.protocol.envelopes import Chat

from ..hookserver import HookServer
from ..servers import Server, start_server

SECRET = "e2e-hook-secret-" + "k" * 24


@pytest.fixture(scope="module")
def backend() -> Iterator[HookServer]:
    server = HookServer(SECRET).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def served(backend: HookServer) -> Iterator[Server]:
    server = start_server(
        {
            "CONNECT_HOOK_URL": backend.url("connect"),
            "JOIN_HOOK_URL": backend.url("join"),
            "CHAT_HOOK_URL": backend.url("chat"),
            "HOOK_SECRET": SECRET,
            "HOOK_TIMEOUT": "2",
        }
    )
    yield server
    server.terminate()


async def test_the_standalone_service_asks_its_hooks(served: Server, backend: HookServer) -> None:
    with pytest.raises(Forbidden) as refused:
        async with Client(served.ws, username="mallory", timeout=10):
            pass  # pragma: no cover - refused before
    assert refused.value.close_code == 4403
    async with Client(served.ws, username="ann", timeout=10) as ann:
        assert ann.welcome is not None and ann.welcome.user.id == "u-ann"
        with pytest.raises(Forbidden, match="Ann may not join staff"):
            await ann.join("staff")
        await ann.join("lobby")
        ack = await ann.send("lobby", "hello")
        async for envelope in ann:
            if isinstance(envelope, Chat):
                assert (envelope.text, envelope.offset) == ("HELLO", ack.offset)
                break
    assert {s.hook for s in backend.seen} == {"connect", "join", "chat"}
    assert all(s.verified for s in backend.seen)
    assert SECRET not in served.log()
