"""A typed asyncio client on the server's own Structs: requests, events, reconnects.

async with Client("ws://127.0.0.1:8000", username="ann") as c:
    await c.join("lobby", history=10)
    await c.send("lobby", "hello")
    async for envelope in c:
        match envelope:
            case Chat(room=room, user=user, text=text):
                print(room, user.name, text)

Requests (`join`, `send`, `leave`, `presence`, `ping`) carry a uuid4 `ref`;
their answer (`joined`, `ack`, `left`, `presence`, `pong`, or an `error` with
that `ref`, raised as a `ClientError`) resolves the request and is not
yielded by iteration. Everything else the server sends is yielded, in order,
with the client's own events (`Disconnected`, `Reconnected`,
`RecoveryFailed`) among them.

After a 1012, 4408, 4429 or a lost network the client reconnects with
exponential backoff and full jitter, under the same `client` id, rejoins
every room with `since` = the last offset it queued for that room, never
yields an offset twice, and re-sends unacknowledged chats with their
original `ref` (the server acknowledges a repeated `ref` with the original
offset and stores it once). 4401 is retried only with a new token from
`token_refresh`; 4403, 1008 and 1009 are final: pending requests and the
iterator raise them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterable
from typing import Final, TypeVar, Union, cast

import msgspec
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from ..protocol.codec import encode, server_decoder
from ..protocol.codes import Close
from ..protocol.envelopes import (
    SERVER_TYPES,
    Ack,
    Chat,
    ClientEnvelope,
    Error,
    GetPresence,
    Join,
    Joined,
    Leave,
    Left,
    Notification,
    Ping,
    Pong,
    Presence,
    SendChat,
    ServerEnvelope,
    Welcome,
)
from .dial import ConnectionEnded, Dial, Socket, open_connection, websockets_dial
from .events import (
    ClientError,
    Closed,
    ConnectionFailed,
    Disconnected,
    Event,
    InvalidRequest,
    RateLimited,
    Reconnected,
    RecoveryFailed,
    RequestTimeout,
    ServerFailed,
    Unauthorized,
    close_error,
)
from .inbox import Inbox
from .keepalive import Heartbeat, TokenRefresh, Tokens
from .requests import Requests
from .rules import FINAL_CLOSES, Positions, backoff_delay, ws_endpoint

log = logging.getLogger("roomcast.client")

TIMEOUT: Final = 15.0
R = TypeVar("R", bound=ServerEnvelope)


class Client:
    """One logical connection to a roomcast server that survives reconnects."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        username: str | None = None,
        client_id: str | None = None,
        token_refresh: TokenRefresh | None = None,
        *,
        timeout: float = TIMEOUT,
        backoff: tuple[float, float] = (0.25, 8.0),
        envelopes: Iterable[type[ServerEnvelope]] = (),
        max_queue: int = 4096,
        dial: Dial = websockets_dial,
    ) -> None:
        self.client_id = client_id or uuid.uuid4().hex
        query = {"client": self.client_id}
        if username is not None:
            query["username"] = username
        self.url = ws_endpoint(url, query)
        self.tokens = Tokens(token, token_refresh, timeout)
        self.heartbeat = Heartbeat()
        self.timeout = timeout
        self.backoff = backoff
        self._dial = dial
        extra = tuple(envelopes)
        self._decoder: msgspec.json.Decoder[ServerEnvelope] = (
            msgspec.json.Decoder(Union[(*SERVER_TYPES, *extra)])
            if extra
            else cast("msgspec.json.Decoder[ServerEnvelope]", server_decoder)
        )
        self.welcome: Welcome | None = None
        self.positions = Positions()  # joined rooms: the last offset queued
        self.inbox = Inbox(max_queue)
        self.requests = Requests()
        self._rejoins: set[str] = set()
        self._ws: Socket | None = None
        self._generation = 0
        self._ready = False
        self._runner: asyncio.Task[None] | None = None
        self._closing = False

    # --- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the first connection; raises ConnectionFailed, Unauthorized, Forbidden …"""
        if self._runner is not None:
            raise RuntimeError("connect() once per Client")
        if self.tokens.due():
            await self.tokens.refresh()
        try:
            try:
                ws = await self._open()
            except Unauthorized:
                if self.tokens.refresh_with is None:
                    raise
                await self.tokens.refresh()  # once: the token may just have expired
                ws = await self._open()
        except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
            raise ConnectionFailed(
                "connection_failed", f"cannot connect to {self._safe_url()}: {exc}"
            ) from None
        self._runner = asyncio.create_task(self._run(ws), name="roomcast-client")

    async def close(self) -> None:
        """Leave every room implicitly (normal close 1000) and end iteration."""
        self._closing = True
        ws, runner = self._ws, self._runner
        if ws is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.timeout):
                    await ws.close()
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner
        self._finish(Closed("client_closed", "The client was closed."))

    # --- requests ------------------------------------------------------------

    async def join(self, room: str, history: int | None = None) -> Joined:
        """Join `room`, replaying its last `history` messages (yielded before later ones)."""
        return await self._request(Join(room=room, history=history), Joined)

    async def send(self, room: str, text: str) -> Ack:
        """Send a chat; returns its `ack` (with the offset), across reconnects."""
        return await self._request(SendChat(room=room, text=text), Ack)

    async def leave(self, room: str) -> Left:
        return await self._request(Leave(room=room), Left)

    async def presence(self, room: str) -> Presence:
        return await self._request(GetPresence(room=room), Presence)

    async def ping(self) -> Pong:
        return await self._request(Ping(), Pong)

    async def _request(self, message: ClientEnvelope, answer: type[R]) -> R:
        if self.inbox.fatal is not None:
            raise self.inbox.fatal
        ref, future = self.requests.open(message)
        try:
            if self._ready:  # else the reconnect sends it, in order
                await self._transmit(message)
            async with asyncio.timeout(self.timeout):
                reply = await future
        except TimeoutError:
            raise RequestTimeout(
                "timeout", f"no answer to {type(message).__name__} within the timeout", ref
            ) from None
        finally:
            self.requests.close(ref)
        if not isinstance(reply, answer):
            raise InvalidRequest("unexpected", f"expected {answer.__name__}, got {reply!r}", ref)
        return reply

    async def _transmit(self, message: ClientEnvelope) -> None:
        ws = self._ws
        if ws is None:
            return
        self.requests.sent(message, self._generation)
        with contextlib.suppress(ConnectionClosed):  # re-sent after the reconnect
            await ws.send(encode(message))

    # --- iteration -----------------------------------------------------------

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> Event:
        return await self.inbox.next()

    async def receive(self) -> Event:
        """The next envelope or event, within the client's `timeout`."""
        async with asyncio.timeout(self.timeout):
            return await self.__anext__()

    # --- connections ---------------------------------------------------------

    def _safe_url(self) -> str:
        return self.url.split("?", 1)[0]

    async def _open(self) -> Socket:
        ws, self.welcome = await open_connection(
            self._dial, self.url, self.tokens.token, self.timeout, self._decoder
        )
        self.heartbeat.heard()
        return ws

    async def _run(self, ws: Socket) -> None:
        attempts = 0
        try:
            while True:
                if attempts and self.welcome is not None:
                    await self.inbox.put(Reconnected(attempts=attempts, welcome=self.welcome))
                try:
                    await self._session(ws)
                except ConnectionEnded as closed:
                    if self._closing:
                        return
                    if closed.code in FINAL_CLOSES or closed.code == Close.NORMAL:
                        raise close_error(closed.code, closed.reason, closed.last) from None
                    if closed.code == Close.UNAUTHORIZED and self.tokens.refresh_with is None:
                        raise close_error(closed.code, closed.reason, closed.last) from None
                    log.info("connection lost (%s %s): reconnecting", closed.code, closed.reason)
                    await self.inbox.put(Disconnected(code=closed.code, reason=closed.reason))
                    ws, attempts = await self._reconnect(closed.code)
        except ClientError as exc:
            self._finish(exc)
        except Exception as exc:  # a bug: say it, do not hang the caller
            log.exception("roomcast client failed")
            self._finish(ClientError("internal", f"the client failed: {exc!r}"))

    async def _reconnect(self, code: int | None) -> tuple[Socket, int]:
        base, cap = self.backoff
        attempt = 0
        must_refresh = code == Close.UNAUTHORIZED
        while True:
            await asyncio.sleep(backoff_delay(attempt, base, cap))
            attempt += 1
            if must_refresh or self.tokens.due():
                await self.tokens.refresh()
                must_refresh = False
            try:
                return await self._open(), attempt
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                log.info("reconnect attempt %d failed: %r", attempt, exc)
            except Unauthorized:
                if self.tokens.refresh_with is None:
                    raise
                must_refresh = True
            except (RateLimited, ServerFailed):
                pass  # 4429, or 1012 after a failed connect hook: later, with backoff

    async def _session(self, ws: Socket) -> None:
        """Rejoin, re-send, then read until the connection ends (raises ConnectionEnded)."""
        self._ws = ws
        self._generation += 1
        self._ready = False
        tasks = [
            asyncio.create_task(self._heartbeat(ws)),
            asyncio.create_task(self.tokens.keep_fresh(ws)),
        ]
        reader = asyncio.create_task(self._read(ws))
        try:
            await self._resume(ws)
            await reader
        except ConnectionClosed:
            await asyncio.wait([reader], timeout=self.timeout)
            if not reader.done():
                raise ConnectionEnded(None, "closed while resuming", None) from None
            reader.result()
        finally:
            self._ready = False
            for task in (*tasks, reader):
                task.cancel()
            await asyncio.gather(*tasks, reader, return_exceptions=True)

    async def _resume(self, ws: Socket) -> None:
        """Rejoin every room from its last offset, then (re-)send every request in order."""
        self._rejoins.clear()
        for room, since in list(self.positions.items()):
            ref = uuid.uuid4().hex
            self._rejoins.add(ref)
            await ws.send(encode(Join(room=room, since=since, ref=ref)))
        while todo := self.requests.unsent(self._generation):
            for message in todo:
                if self.requests.pending(message):
                    await self._transmit(message)
        self._ready = True  # no await since the last check: nothing is left unsent

    async def _read(self, ws: Socket) -> None:
        last_error: Error | None = None
        try:
            async for frame in ws:
                self.heartbeat.heard()
                try:
                    envelope = self._decoder.decode(frame)
                except msgspec.DecodeError as exc:
                    log.warning("ignored a frame that does not decode: %s", exc)
                    continue
                if isinstance(envelope, Error) and envelope.ref is None:
                    last_error = envelope
                await self._dispatch(envelope)
        except ConnectionClosed:
            pass
        raise ConnectionEnded(ws.close_code, ws.close_reason or "", last_error)

    async def _dispatch(self, envelope: ServerEnvelope) -> None:
        ref: str | None = getattr(envelope, "ref", None)
        if isinstance(envelope, Chat | Notification) and envelope.offset is not None:
            if self.positions.seen(envelope.room, envelope.epoch, envelope.offset):
                return  # already delivered (replayed again after a reconnect)
            # Queued first, recorded after: cancelled while waiting, it is replayed again.
            await self.inbox.put(envelope)
            self.positions.record(envelope.room, envelope.epoch, envelope.offset)
            return
        if isinstance(envelope, Joined):
            self.positions.joined(envelope)
            if ref in self._rejoins:
                self._rejoins.discard(ref)
                if not envelope.recovered:
                    await self.inbox.put(RecoveryFailed(room=envelope.room, joined=envelope))
                return
        elif isinstance(envelope, Left):
            self.positions.pop(envelope.room, None)
        elif isinstance(envelope, Pong) and self.heartbeat.answered(ref):
            return
        elif isinstance(envelope, Error) and ref in self._rejoins:
            self._rejoins.discard(ref)
            if envelope.room is not None:
                self.positions.pop(envelope.room, None)
        if self.requests.answer(ref, envelope):
            return
        if isinstance(envelope, Ack):
            return  # a repeated ack of a chat whose request already ended
        await self.inbox.put(envelope)

    def _finish(self, error: ClientError) -> None:
        """End for good: fail what is pending, end iteration (raising `error` if final)."""
        self.requests.fail(self.inbox.end(error))

    async def _heartbeat(self, ws: Socket) -> None:
        if self.welcome is not None:
            await self.heartbeat.run(ws, float(self.welcome.heartbeat), self.inbox.full)

    @property
    def token(self) -> str | None:
        """The current token (a new one after each `token_refresh`)."""
        return self.tokens.token

    @property
    def unanswered(self) -> int:
        """Requests sent and still waiting for their answer (they go again, with the
        same `ref`, on the next connection)."""
        return self.requests.unanswered

    @property
    def resent(self) -> int:
        """Requests sent again on a new connection (with their original `ref`)."""
        return self.requests.resent
