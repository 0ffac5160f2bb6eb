"""Test a roomcast app in process: no server, no sockets, no ports.

async def test_moderation() -> None:
    async with RoomcastTest(app) as t:          # a Roomcast, or a Starlette app mounting one
        ann = await t.connect("/ws", username="ann")
        bob = await t.connect("/ws/lobby", username="bob")
        await ann.join("lobby")
        ack = await ann.send("lobby", "darn")
        chat = await bob.expect(Chat, timeout=1.0)
        assert chat.offset == ack.offset

`RoomcastTest` runs the app's lifespan, and `connect()` returns the typed client of
`roomcast.client` talking ASGI to the app directly (the same requests, envelopes and
`ClientError`s), plus `expect()`. `t.http` is an httpx client for the app's HTTP routes.
On exit every client is closed, the lifespan ends, and no task is left running; an
exception the app raised on a WebSocket is raised there, not hidden behind a timeout.
asyncio only (pytest-asyncio, or anyio's pytest plugin with the asyncio backend).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, Final, TypeVar
from urllib.parse import unquote, urlsplit

import httpx
from starlette.types import ASGIApp, Message, Scope
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK
from websockets.frames import Close

from .client import Client, ConnectionFailed
from .client.dial import Socket
from .client.events import Event
from .protocol.envelopes import Error, Joined, ServerEnvelope

__all__ = ["InProcessClient", "RoomcastTest"]

log = logging.getLogger("roomcast.testing")

HOST: Final = "testserver"
TIMEOUT: Final = 5.0
E = TypeVar("E")
_ports = itertools.count(50000)


class AppFailed(RuntimeError):
    """The app raised an exception while serving a WebSocket (it is the `__cause__`)."""


class InProcessClient(Client):
    """`roomcast.client.Client` on an in-process connection, with `expect()`."""

    def __init__(self, *args: Any, auto_join: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.auto_join = auto_join  # the room of `/ws/{room}`
        self.auto_joined = asyncio.Event()

    async def _dispatch(self, envelope: ServerEnvelope) -> None:
        await super()._dispatch(envelope)
        if (
            isinstance(envelope, Joined | Error)
            and envelope.ref is None
            and envelope.room == self.auto_join
        ):
            self.auto_joined.set()

    async def expect(self, kind: type[E], timeout: float = 1.0) -> E:  # noqa: ASYNC109
        """The next envelope (or client event) of type `kind`; those before it are passed
        over. Fails with an AssertionError that lists what came instead."""
        passed: list[Event] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    item = await self.inbox.next()
                    if isinstance(item, kind):
                        return item
                    passed.append(item)
        except TimeoutError:
            raise AssertionError(
                f"no {kind.__name__} within {timeout}s; came instead: {_listing(passed)}"
            ) from None
        except StopAsyncIteration:
            raise AssertionError(
                f"the connection was closed before a {kind.__name__}; came instead: "
                f"{_listing(passed)}"
            ) from None
        except Exception as exc:  # the connection ended with an error: say what came first
            exc.add_note(f"waiting for {kind.__name__}; came before it: {_listing(passed)}")
            raise


def _listing(items: list[Event]) -> str:
    return "nothing" if not items else "; ".join(f"{item!r:.300}" for item in items)


class _Transport:
    def __init__(self, socket: AsgiSocket) -> None:
        self._socket = socket

    def abort(self) -> None:
        self._socket.abort()


class AsgiSocket:
    """One WebSocket between the client and the app, as ASGI messages in two queues.

    It is the client's `Socket`, and the app's `receive` and `send`: a frame the app
    sends is queued at once (so roomcast writes it inline, as to a real server),
    and `transport.abort()` drops the connection as a lost network would.
    """

    def __init__(self, app: ASGIApp, scope: Scope, failures: list[BaseException]) -> None:
        self.app, self.scope, self._failures = app, scope, failures
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._to_client: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self._opened: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.transport = _Transport(self)
        self.subprotocol: str | None = None
        self.task: asyncio.Task[None] | None = None
        # The server's own `send`: roomcast drops a client that stopped reading through it.
        scope["roomcast.server_send"] = self.app_send

    async def open(self, within: float) -> None:
        self._to_app.put_nowait({"type": "websocket.connect"})
        self.task = asyncio.create_task(self._serve(), name=f"roomcast-test {self.scope['path']}")
        async with asyncio.timeout(within):
            answer = await asyncio.shield(self._opened)
        if answer["type"] != "websocket.accept":
            await self._end()
            raise ConnectionFailed(
                "connection_failed",
                f"the app refused the WebSocket handshake of {self.scope['path']!r} (HTTP 403): "
                "is it a roomcast endpoint (/ws or /ws/{room}, below its mount)?",
            )

    async def _serve(self) -> None:
        try:
            await self.app(self.scope, self.app_receive, self.app_send)
        except Exception as exc:
            log.error("the app failed on %s", self.scope["path"], exc_info=True)
            self._failures.append(exc)
            self._closed(1011, "the app failed", tell_app=False)
        finally:
            if not self._opened.done():
                self._opened.set_result({"type": "websocket.close"})
            self._closed(1006, "", tell_app=False)

    # --- the app's side ----------------------------------------------------

    async def app_receive(self) -> Message:
        return await self._to_app.get()

    async def app_send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "websocket.accept":
            self.subprotocol = message.get("subprotocol")
            if not self._opened.done():
                self._opened.set_result(message)
        elif kind == "websocket.send":
            if self.close_code is not None:
                raise OSError("the client closed the connection")
            text = message.get("text")
            self._to_client.put_nowait(text if text is not None else message["bytes"])
        elif kind == "websocket.close":
            if not self._opened.done():  # refused before the accept
                self._opened.set_result(message)
            self._closed(message.get("code") or 1000, message.get("reason") or "", tell_app=True)
        else:
            raise RuntimeError(f"the in-process test server does not support {kind!r}")

    # --- the client's side (roomcast.client.dial.Socket) ---------------------

    async def send(self, message: str) -> None:
        if self.close_code is not None:
            raise self._closed_error()
        self._to_app.put_nowait({"type": "websocket.receive", "text": message})

    async def recv(self) -> str | bytes:
        frame = await self._to_client.get()
        if frame is None:
            self._to_client.put_nowait(None)  # every later recv() raises too
            raise self._closed_error()
        return frame

    def __aiter__(self) -> AsyncIterator[str | bytes]:
        return self

    async def __anext__(self) -> str | bytes:
        try:
            return await self.recv()
        except ConnectionClosedOK:
            raise StopAsyncIteration from None

    async def close(self) -> None:
        self._closed(1000, "", tell_app=True)
        await self._end()

    def abort(self) -> None:
        self._closed(1006, "", tell_app=True)

    def _closed(self, code: int, reason: str, *, tell_app: bool) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
            self._to_client.put_nowait(None)
            if tell_app:
                self._to_app.put_nowait({"type": "websocket.disconnect", "code": code})

    def _closed_error(self) -> ConnectionClosedOK | ConnectionClosedError:
        code = self.close_code or 1006
        if code in (1000, 1001):
            return ConnectionClosedOK(Close(code, self.close_reason or ""), None)
        rcvd = None if code == 1006 else Close(code, self.close_reason or "")
        return ConnectionClosedError(rcvd, None)

    async def _end(self, within: float = TIMEOUT) -> None:
        """Wait for the app to finish with this connection (cancel it past `within`)."""
        task = self.task
        if task is None or task.done():
            return
        done, _ = await asyncio.wait([task], timeout=within)
        if not done:
            log.error("the app did not finish %s within %ss: cancelled", self.scope["path"], within)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class _Lifespan:
    """The app's ASGI lifespan, run as a server runs it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.started = False

    async def _run(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": self.state}

        async def send(message: Message) -> None:
            self._from_app.put_nowait(message)

        try:
            await self.app(scope, self._to_app.get, send)
        except BaseException as exc:
            self._from_app.put_nowait({"type": "lifespan.crashed", "message": repr(exc)})
            raise

    async def _step(self, step: str, within: float) -> None:
        self._to_app.put_nowait({"type": f"lifespan.{step}"})
        async with asyncio.timeout(within):
            answer = await self._from_app.get()
        if answer["type"] != f"lifespan.{step}.complete":
            raise RuntimeError(f"the app's lifespan {step} failed: {answer.get('message', '')}")
        self.started = step == "startup"

    async def start(self, within: float) -> None:
        self._task = asyncio.create_task(self._run(), name="roomcast-test lifespan")
        try:
            await self._step("startup", within)
        except BaseException:
            await self.stop(within)
            raise

    async def stop(self, within: float) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        try:
            if not task.done() and self.started:
                await self._step("shutdown", within)
        finally:
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class RoomcastTest:
    """The app in process, its lifespan running: `async with RoomcastTest(app) as t:`."""

    def __init__(self, app: ASGIApp, *, timeout: float = TIMEOUT) -> None:
        self.app = app
        self.timeout = timeout
        self.clients: list[InProcessClient] = []
        self.sockets: list[AsgiSocket] = []
        self.failures: list[BaseException] = []
        self._lifespan = _Lifespan(app)
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self._with_state), base_url=f"http://{HOST}"
        )

    async def _with_state(self, scope: Scope, receive: Any, send: Any) -> None:
        await self.app({**scope, "state": dict(self._lifespan.state)}, receive, send)

    async def __aenter__(self) -> RoomcastTest:
        await self._lifespan.start(self.timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await asyncio.gather(*(c.close() for c in self.clients))
            await asyncio.gather(*(s.close() for s in self.sockets))
            await self.http.aclose()
        finally:
            await self._lifespan.stop(self.timeout)
        if self.failures and exc[0] is None:
            raise AppFailed(f"the app failed on a WebSocket: {self.failures[0]!r}") from (
                self.failures[0]
            )

    async def connect(
        self,
        path: str = "/ws",
        *,
        username: str | None = None,
        client_id: str | None = None,
        token: str | None = None,
        cookies: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        envelopes: Iterable[type[ServerEnvelope]] = (),
        client_address: str = "127.0.0.1",
        timeout: float | None = None,  # noqa: ASYNC109 - the client's, for each request
    ) -> InProcessClient:
        """A client connected to `path` (`/ws`, `/ws/{room}`, or either below a mount;
        `?since=`/`?history=` may follow); a refused connect raises its `ClientError`.
        On `/ws/{room}` it returns once the room is joined (its `joined` is yielded)."""
        extra: list[tuple[bytes, bytes]] = [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()
        ]
        if cookies:
            cookie = "; ".join(f"{k}={v}" for k, v in cookies.items())
            extra.append((b"cookie", cookie.encode("latin-1")))

        async def dial(url: str, subprotocols: list[str], open_timeout: float) -> Socket:
            socket = self._socket(url, subprotocols, extra, client_address)
            await socket.open(open_timeout)
            return socket

        target = urlsplit(path)
        _, ws, room = unquote(target.path).rpartition("/ws/")
        client = InProcessClient(
            f"ws://{HOST}",
            auto_join=room if ws and room and "/" not in room else None,
            token=token,
            username=username,
            client_id=client_id,
            timeout=timeout or self.timeout,
            envelopes=envelopes,
            dial=dial,
        )
        query = urlsplit(client.url).query  # the client's own: client id, username
        client.url = f"ws://{HOST}{target.path}?" + "&".join(q for q in (target.query, query) if q)
        await client.connect()
        self.clients.append(client)
        if client.auto_join is not None:
            async with asyncio.timeout(client.timeout):
                await client.auto_joined.wait()
        return client

    def _socket(
        self, url: str, subprotocols: list[str], headers: list[tuple[bytes, bytes]], address: str
    ) -> AsgiSocket:
        if self.failures:
            raise AppFailed(f"the app failed on a WebSocket: {self.failures[0]!r}")
        parts = urlsplit(url)
        scope: Scope = {
            "type": "websocket",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "scheme": "ws",
            "server": (HOST, 80),
            "client": (address, next(_ports)),
            "root_path": "",
            "path": unquote(parts.path),
            "raw_path": parts.path.encode(),
            "query_string": parts.query.encode(),
            "headers": [
                (b"host", HOST.encode()),
                (b"connection", b"Upgrade"),
                (b"upgrade", b"websocket"),
                (b"sec-websocket-version", b"13"),
                (b"sec-websocket-protocol", ", ".join(subprotocols).encode()),
                *headers,
            ],
            "subprotocols": subprotocols,
            "state": dict(self._lifespan.state),
        }
        socket = AsgiSocket(self.app, scope, self.failures)
        self.sockets.append(socket)
        return socket
